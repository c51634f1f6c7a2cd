"""The probe suite's settings from the command line: what a flag sets is what the suite runs with."""
import argparse

from landscape.study.suite import ProbeSettings


def _settings(*argv):
    parser = argparse.ArgumentParser()
    ProbeSettings.add_arguments(parser)
    return ProbeSettings.from_arguments(parser.parse_args(list(argv)))


def test_noise_draws_are_antithetic_unless_asked_otherwise():
    assert _settings().noise_antithetic is True
    assert _settings("--no-antithetic").noise_antithetic is False
    # a probe part's fingerprint tells the two apart, so one is never reused for the other
    assert _settings().as_dict() != _settings("--no-antithetic").as_dict()
