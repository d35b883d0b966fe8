"""StitchOptions: defaults, validation on construction, one help line per field, keyword resolution."""

import dataclasses

import pytest

from py4dstem_deepcdi.stitching import StitchOptions
from py4dstem_deepcdi.stitching.options import field_names, resolve_options


def test_defaults_are_the_papers_and_frozen():
    opts = StitchOptions()
    assert (opts.method, opts.min_overlap, opts.n_iter, opts.step, opts.tol, opts.max_iter) == (
        "lsq", 0.25, 3, 0.1, 1e-8, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.method = "relaxation"
    assert field_names() == ("method", "min_overlap", "n_iter", "step", "tol", "max_iter")


def test_every_field_has_a_help_line():
    for f in dataclasses.fields(StitchOptions):
        text = f.metadata["help"]
        assert isinstance(text, str) and 10 < len(text) < 120 and "\n" not in text


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"method": "magic"}, r"method must be one of \('lsq', 'relaxation'\), got 'magic'"),
        ({"min_overlap": 0.0}, r"min_overlap must be in \(0, 1\]"),
        ({"min_overlap": 1.5}, r"min_overlap must be in \(0, 1\]"),
        ({"n_iter": -1}, "n_iter must be an integer >= 0"),
        ({"n_iter": 2.5}, "n_iter must be an integer >= 0"),
        ({"step": 0.0}, r"step must be in \(0, 1\] for a stable relaxation"),
        ({"step": 1.5}, r"step must be in \(0, 1\] for a stable relaxation"),
        ({"tol": 0.0}, "tol must be > 0"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ],
)
def test_out_of_range_fields_raise(keywords, message):
    with pytest.raises(ValueError, match=message):
        StitchOptions(**keywords)
    with pytest.raises(ValueError, match=message):  # also when replaced through keywords
        resolve_options(StitchOptions(), keywords, "stitch")


def test_resolve_options_replaces_named_fields_only():
    base = StitchOptions(method="relaxation", n_iter=7)
    assert resolve_options(None, {}, "stitch") == StitchOptions()
    assert resolve_options(base, {}, "stitch") is base
    assert resolve_options(base, {"step": 0.5}, "stitch") == StitchOptions(method="relaxation", n_iter=7, step=0.5)
    with pytest.raises(TypeError, match="got unexpected keyword argument\\(s\\) 'tilt', 'weights'; the options are "
                                        "method, min_overlap, n_iter, step, tol, max_iter"):
        resolve_options(None, {"weights": 1, "tilt": True}, "stitch")
    with pytest.raises(TypeError, match="options must be a StitchOptions, got dict"):
        resolve_options({"method": "lsq"}, {}, "stitch")
