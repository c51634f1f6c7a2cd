"""The command lines of flatlora-landscape (``flatlora-train``, ``flatlora-probe``, ``flatlora-figures``,
``flatlora-study``): each module parses its arguments and calls the packages. Run them as
``python analysis_scripts/NAME.py`` or, once installed, by their command names."""
