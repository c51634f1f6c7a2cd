"""One study's code — the flatness-mismatch study: the probe suite (:mod:`.suite`), text corruptions
(:mod:`.corruption`) and robustness (:mod:`.robustness`), paired error analysis
(:mod:`.error_analysis`), the report's tables and tests (:mod:`.report`), figures (:mod:`.figures`)
and the stages that tie them together (:mod:`.pipeline`). Not imported by :mod:`landscape`."""
