"""Property-based tests (hypothesis) of the public entry points with careless and hostile input (issue 18).

Random shapes, dtypes (integers, uint16, float16/32/64, bool, complex, object), NaN and inf, extreme values (0,
1e-30, 1e35, negative), wrong calibrations (units, sizes), damaged model files and bad keyword values. The property
is always the same: the call returns a correct result (finite, of the documented shape and dtype, e.g. patches zero
outside the mask) or raises a ``ValueError``/``TypeError`` (for files also ``OSError``) with a message; never another
exception, a hang or silent garbage (NaN).

Every argument has good values and bad ones; an example spoils at most two arguments (:func:`spoiled`), so that
most examples reach the computation and the rest fail in one or two ways at a time. ``derandomize=True`` draws the
same examples on every run; the examples are few and the scans tiny (≤ 6×6 patterns of 32×32 pixels), so the file
runs in seconds. ``--hypothesis-show-statistics`` shows how many examples gave a result and how many were refused.
The issue's own cases are pinned with ``@example`` or tested by name at the end of each section.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from py4dstem_deepcdi.dose import thin_counts
from py4dstem_deepcdi.encoding import network_input
from py4dstem_deepcdi.inference import predict
from py4dstem_deepcdi.models import DeepCDIModel, load_model
from py4dstem_deepcdi.network import ResUNet
from py4dstem_deepcdi.preprocessing import preprocess
from py4dstem_deepcdi.probe import ProbeGeometry
from py4dstem_deepcdi.reconstruction import DeepCDIReconstruction
from py4dstem_deepcdi.scan import calibrated_datacube, scan_positions
from py4dstem_deepcdi.simulation import simulate_dataset
from py4dstem_deepcdi.stitching import StitchOptions, stitch

NAN, INF = float("nan"), float("inf")
WAVELENGTH = 0.019687486388201916  # Å at 300 keV
MRAD_AS_INVERSE_A = 2e-3 / WAVELENGTH  # 2 mrad in Å⁻¹


def bounded(n: int):
    """Settings of every property: ``n`` reproducible examples, no per-example deadline (a loaded CI machine)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def spoiled(draw, choices: dict, most: int = 2) -> dict:
    """One value per name of ``choices`` (name → (good, bad), each a list or a strategy): a good one, except for at
    most ``most`` drawn names, which get a bad one."""
    names = sorted(name for name, (_, bad) in choices.items() if bad)
    spoil = draw(st.sets(st.sampled_from(names), max_size=most)) if names else set()
    values = {}
    for name, (good, bad) in choices.items():
        pick = bad if name in spoil else good
        values[name] = draw(pick if isinstance(pick, st.SearchStrategy) else st.sampled_from(pick))
    return values


def outcome(call, allowed=(ValueError, TypeError)):
    """``call()``'s result, or None when it raised one of ``allowed`` with a message; any other exception fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except allowed as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        event(f"refused: {type(exc).__name__}")  # --hypothesis-show-statistics counts the outcomes
        return None
    event("result")
    return result


def finite(array) -> bool:
    return bool(np.all(np.isfinite(np.asarray(array))))


# ------------------------------------------------------------------ shared, built once
@pytest.fixture(scope="module")
def tiny_model(geometry):
    """An untrained network (tests/test_reconstruction.py's): these properties check the plumbing, not the image."""
    return DeepCDIModel(ResUNet(width=0.125, depth=2).eval(), geometry, {"name": "tiny"})


@pytest.fixture(scope="module")
def clean(geometry):
    """A 6×6 scan of 32×32 patterns at 10⁵ e⁻ with the conftest geometry, float64."""
    ds = simulate_dataset(geometry, scan_shape=(6, 6), scan_step=0.3, electrons=1e5, seed=4)
    return np.asarray(ds.datacube.data, dtype=np.float64)


# ------------------------------------------------------------------ datacubes and preprocess()
#: how the clean scan is cut, scaled, damaged and cast (good: data that should reconstruct, defects included)
DATA = {
    "rx": ([2, 3, 4, 5, 6], [1]),
    "ry": ([2, 3, 4, 5, 6], [1]),
    "detector": ([32, 40], [24]),
    "scale": ([1.0, 1e-30, 1e-3, 1e3, 1e35], [0.0, -1.0]),
    "dtype": (["float64", "float32", "uint16", "int32"], ["float16", "bool", "complex64", "object"]),
    "fault": ([None, "hot", "dead row"], ["nan", "inf", "negative", "empty pattern", "all zero", "noise"]),
    "value": ([1e3, 1e6, 1e8, 1e35], []),
    "where": (st.tuples(*[st.integers(0, 31)] * 4), []),
}
CALIBRATION = {
    "scan_step": ([0.3, 0.6, (0.3, 0.25), 1e-30, 1e35], [None, 0.0, -1.0, NAN, INF]),
    "angular_sampling": ([2.0], [2.2, 1.8, MRAD_AS_INVERSE_A, None, 0.0, 1e-30, 1e35, -1.0, NAN, INF]),
}
PREPROCESS = {
    "rotation_deg": ([0.0, None, 30.0, -400.0], [NAN, INF, "30"]),
    "transpose": ([False, None, True], []),
    "subsample": ([1, 2, 3], [0, -1, 10]),
    "centre": ([True, False], []),
    "chunk_rows": ([16, 1, 2], [0, -1, 2.5]),
    "pool": ([1, 3], [2]),
    "repair": ([True, False], []),
    "normalise": (["pattern", "dataset"], ["mean"]),
    "check_calibration": ([True, False], []),
}


def build(clean: np.ndarray, case: dict) -> np.ndarray:
    """The clean scan cut to ``rx × ry``, padded or cropped to the detector, scaled, damaged and cast."""
    rx, ry, q = case["rx"], case["ry"], case["detector"]
    data = clean[:rx, :ry].copy()
    if q > 32:
        pad = (q - 32) // 2
        data = np.pad(data, [(0, 0), (0, 0), (pad, q - 32 - pad), (pad, q - 32 - pad)])
    elif q < 32:
        cut = (32 - q) // 2
        data = data[..., cut : cut + q, cut : cut + q]
    data = data * case["scale"]
    i, j, a, b = case["where"]
    i, j, a, b = i % rx, j % ry, a % q, b % q
    fault = case["fault"]
    if fault == "nan":
        data[i, j, a, b] = NAN
    elif fault == "inf":
        data[i, j, a, b] = INF
    elif fault == "negative":
        data[i, j, a, b] = -case["value"]
    elif fault == "hot":
        data[i, j, a, b] = case["value"]
    elif fault == "empty pattern":
        data[i, j] = 0
    elif fault == "dead row":
        data[..., a, :] = 0
    elif fault == "all zero":
        data[:] = 0
    elif fault == "noise":
        data = np.random.default_rng(a).poisson(100.0, data.shape).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller's own cast (1e35 to uint16): whatever it gives is the data
        return data.astype(case["dtype"])


def check_preprocessed(d, data_shape, subsample: int, pool: int) -> None:
    sx, sy = (-(-n // subsample) for n in data_shape[:2])
    assert d.scan_shape == (sx, sy)
    assert d.amplitudes.shape == (sx * sy, 32, 32) and d.amplitudes.dtype == np.float32
    assert finite(d.amplitudes) and d.amplitudes.min() >= 0
    assert d.positions.shape == (sx * sy, 2) and finite(d.positions)
    assert math.isfinite(d.electrons_per_pattern) and d.electrons_per_pattern > 0
    assert finite(d.pattern_electrons) and finite(d.centre) and math.isfinite(d.rotation_deg)
    if pool == 3:
        assert d.pooled.shape == d.amplitudes.shape and finite(d.pooled) and finite(d.neighbour_offsets)
    report = json.loads(json.dumps(d.report))  # JSON-ready (an unknown rotation's uncertainty is inf)
    assert finite(report["electrons_per_pattern_percentiles"]) and math.isfinite(report["bright_field_radius_mrad"])


GOOD_CASE = {"rx": 6, "ry": 6, "detector": 32, "scale": 1.0, "dtype": "float32", "fault": None, "value": 1e3,
             "where": (0, 0, 0, 0), "scan_step": 0.3, "angular_sampling": 2.0, "rotation_deg": 0.0,
             "transpose": False, "subsample": 1, "centre": True, "chunk_rows": 16, "pool": 1, "repair": True,
             "normalise": "pattern", "check_calibration": True}


@bounded(120)
@given(case=spoiled({**DATA, **CALIBRATION, **PREPROCESS}))
@example(case={**GOOD_CASE, "fault": "hot", "value": 1e6, "where": (2, 3, 3, 20)})  # one hot pixel of 1e6
@example(case={**GOOD_CASE, "scale": 1e35, "pool": 3})  # counts ×1e35 in float32 (a float32 sum overflows)
@example(case={**GOOD_CASE, "chunk_rows": -1})  # read uninitialised memory as disk centres
@example(case={**GOOD_CASE, "angular_sampling": MRAD_AS_INVERSE_A})  # Å⁻¹ labelled mrad
def test_preprocess_gives_clean_input_or_a_clear_error(clean, geometry, case):
    """preprocess(): finite, non-negative float32 amplitudes of the right shape, finite positions and a JSON report;
    or a ValueError/TypeError. The user's array is never modified."""
    data = build(clean, case)
    before = data.tobytes() if data.dtype != object else None
    keywords = {name: case[name] for name in (*CALIBRATION, *PREPROCESS)}
    d = outcome(lambda: preprocess(data, geometry, **keywords))
    if d is not None:
        check_preprocessed(d, data.shape, case["subsample"], case["pool"])
    if before is not None:
        assert data.tobytes() == before


@bounded(25)
@given(case=spoiled({
    "r_units": (["A", "nm", "pm"], ["pixels", "m"]),
    "r_size": ([0.3, 0.03, 1e35], [0.0, -0.3, NAN]),
    "q_units": (["mrad", "A^-1"], ["pixels"]),  # py4DSTEM itself refuses other Q units
    "q_error": ([1.0], [1.1, 0.9, "units swapped", 0.0, NAN, 1e35]),
}))
@example(case={"r_units": "A", "r_size": 0.3, "q_units": "A^-1", "q_error": "units swapped"})  # mrad labelled Å⁻¹
def test_datacube_calibrations_are_used_or_refused(clean, geometry, case):
    """A DataCube's own R and Q calibrations (any units and sizes): a clean result or a ValueError; a correct
    calibration in other units gives the step in Å."""
    datacube = calibrated_datacube(clean[:4, :4].astype(np.float32), 0.3, 2.0)
    right = {"mrad": 2.0, "A^-1": MRAD_AS_INVERSE_A, "pixels": 1.0}[case["q_units"]]
    swapped = {"mrad": MRAD_AS_INVERSE_A, "A^-1": 2.0, "pixels": 1.0}[case["q_units"]]
    q_size = swapped if case["q_error"] == "units swapped" else right * case["q_error"]
    datacube.calibration.set_R_pixel_size(case["r_size"])
    datacube.calibration.set_R_pixel_units(case["r_units"])
    datacube.calibration.set_Q_pixel_size(q_size)
    datacube.calibration.set_Q_pixel_units(case["q_units"])
    d = outcome(lambda: preprocess(datacube, geometry, rotation_deg=0.0, transpose=False))
    if d is not None:
        check_preprocessed(d, (4, 4), 1, 1)
        length = {"A": 1.0, "nm": 10.0, "pm": 0.01}[case["r_units"]]
        assert d.scan_step == pytest.approx((case["r_size"] * length,) * 2)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("chunk_rows", 0), ("chunk_rows", -1), ("chunk_rows", 2.5), ("subsample", 0), ("pool", 2),
     ("normalise", "mean"), ("rotation_deg", NAN), ("scan_step", -0.3), ("angular_sampling", INF)],
)
def test_bad_preprocess_keywords_are_named(clean, geometry, keyword, value):
    """A bad keyword of preprocess() is refused with a ValueError naming it (chunk_rows=-1 used to read
    uninitialised memory as disk centres)."""
    options = {"scan_step": 0.3, "angular_sampling": 2.0, "rotation_deg": 0.0, "transpose": False, keyword: value}
    name = {"angular_sampling": "detector pixel size"}.get(keyword, keyword)
    with pytest.raises(ValueError, match=name):
        preprocess(clean[:4, :4], geometry, **options)


# ------------------------------------------------------------------ the whole reconstruction
RECONSTRUCT = {
    "batch_size": ([1024, 7, 1], [0, -2]),
    "precision": (["fp32", "bf16"], ["int8", "fp16"]),
    "stitching": (["lsq", "relaxation"], ["magic"]),
    "min_overlap": ([0.25, 0.01], [0.0, 2.0, NAN]),
    "symmetrize": ([False, True], []),
    "stitch_fraction": ([None, 1.0, 0.5], [0.0, 1.5, NAN]),
    "anchor_ramp": ([False, True], []),
    "runtime": (["torch"], ["tensorflow"]),
}
RECONSTRUCTION_DATA = {  # scans of ≥ 4×4: anchoring the ramp needs a position with 90% of the probe stitched
    **DATA, "rx": ([4, 5, 6], [1, 2]), "ry": ([4, 5, 6], [1, 2]), "dtype": (["float32", "float64", "uint16"], ["bool"]),
    "fault": ([None, "hot"], ["nan", "empty pattern"]),
    "aberrations": ([{}, {"defocus": 100.0}], [{"C10": NAN}, {"C99": 1.0}, {"C10": 0.0}]),
    "vacuum": ([None], ["vacuum.npy", "zeros", "nan", "negative", "3-D"]),
}


@bounded(50)
@given(case=spoiled({**RECONSTRUCTION_DATA, **CALIBRATION, **RECONSTRUCT}))
@example(case={**GOOD_CASE, "aberrations": {}, "vacuum": "vacuum.npy", "batch_size": 7, "precision": "fp32",
               "stitching": "lsq", "min_overlap": 0.25, "symmetrize": False, "stitch_fraction": None,
               "anchor_ramp": True, "runtime": "torch"})  # a path string instead of a vacuum pattern
def test_reconstruction_gives_a_finite_image_or_a_clear_error(clean, tiny_model, case):
    """DeepCDIReconstruction(...).preprocess().reconstruct() with an untrained tiny model: patches (J, 32, 32) zero
    outside the mask, finite offsets and a phase image finite wherever a patch lands; or a ValueError/TypeError."""
    data = build(clean, case)
    vacuum = {None: None, "vacuum.npy": "vacuum.npy", "zeros": np.zeros((32, 32)), "nan": np.full((32, 32), NAN),
              "negative": -np.ones((32, 32)), "3-D": np.ones((2, 32, 32))}[case["vacuum"]]
    probe = {"C10": -100.0, "C12": 20.0, "phi12": 0.5, **case["aberrations"]}
    keywords = {name: case[name] for name in RECONSTRUCT}

    def run():
        recon = DeepCDIReconstruction(
            data, 300e3, 17.1, model=tiny_model, verbose=False, vacuum_probe_intensity=vacuum, rotation_deg=0.0,
            transpose=False, scan_step=case["scan_step"], angular_sampling=case["angular_sampling"], **probe,
        )
        return recon.preprocess().reconstruct(progress=False, **keywords)

    recon = outcome(run)
    if recon is not None:
        j = len(recon.data.amplitudes)
        assert recon.patches.shape == (j, 32, 32) and recon.patches.dtype == np.float32 and finite(recon.patches)
        assert not recon.patches[:, ~recon.probe_geometry.mask].any()
        assert recon.offsets.shape == (j,) and finite(recon.offsets)
        assert recon.object_phase.shape == recon.coverage.shape and (recon.coverage > 0).any()
        assert finite(recon.object_phase[recon.coverage > 0]) and finite(recon.positions_px)


@pytest.mark.parametrize(
    "keywords",
    [{"stitching": "magic"}, {"min_overlap": 2.0}, {"min_overlap": NAN}, {"stitch_fraction": 1.5},
     {"stitching": "lsq", "min_overlap": 0.0}],
)
def test_bad_stitching_options_are_refused_before_inference(clean, tiny_model, keywords):
    """reconstruct() refuses invalid stitching options before the network runs: no patches were computed."""
    recon = DeepCDIReconstruction(clean[:4, :4], 300e3, 17.1, C10=-100.0, C12=20.0, phi12=0.5, model=tiny_model,
                                  scan_step=0.3, angular_sampling=2.0, rotation_deg=0.0, transpose=False,
                                  verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recon.preprocess()
    with pytest.raises(ValueError, match="stitching|min_overlap|method|stitch_fraction"):
        recon.reconstruct(progress=False, **keywords)
    assert recon.patches is None


# ------------------------------------------------------------------ the network pass
PREDICT = {
    "dtype": ([np.float32, np.float64, np.float16], [np.int32, np.uint16, np.bool_, np.complex64]),
    "shape": ([(3, 32, 32), (1, 32, 32), (0, 32, 32)], [(2, 31, 32), (32, 32), (1, 2, 32, 32)]),
    "fill": ([1.0, "random", 0.0, 1e-30, 1e35], [NAN, INF, -1.0]),
    "tensor": ([False, True], []),
    "batch_size": ([1024, 2, 1], [0, -1]),
    "precision": (["fp32", "bf16"], ["int8", "fp64"]),
    "symmetrize": ([False, True], []),
    "pooled": ([False], [True]),
    "device": (["cpu"], ["tpu"]),
}


def amplitudes_of(case: dict):
    shape = case["shape"]
    values = np.full(shape, 1.0 if case["fill"] == "random" else case["fill"])
    if case["fill"] == "random":
        values = np.random.default_rng(0).uniform(0, 4, shape)
    elif values.size:
        values.reshape(-1)[:: max(values.size // 5, 1)] = 1.0  # most pixels `fill`, some 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = values.astype(case["dtype"])
    return torch.from_numpy(array) if case["tensor"] and case["dtype"] is not np.uint16 else array


@bounded(50)
@given(case=spoiled(PREDICT))
@example(case={"dtype": np.float32, "shape": (2, 32, 32), "fill": 1e35, "tensor": False, "batch_size": 1024,
               "precision": "fp32", "symmetrize": False, "pooled": False, "device": "cpu"})
def test_predict_gives_masked_finite_patches_or_a_clear_error(tiny_model, case):
    """inference.predict: (J, 32, 32) float32 patches, finite, zero outside the mask and zero-mean inside it; or a
    ValueError/TypeError."""
    x = amplitudes_of(case)
    phase = outcome(lambda: predict(tiny_model, x, batch_size=case["batch_size"], precision=case["precision"],
                                    device=case["device"], symmetrize=case["symmetrize"],
                                    pooled=x if case["pooled"] else None))
    if phase is not None:
        mask = tiny_model.geometry.mask
        assert phase.shape == (x.shape[0], 32, 32) and phase.dtype == np.float32 and finite(phase)
        assert not phase[:, ~mask].any()
        np.testing.assert_allclose(phase[:, mask].mean(1), 0, atol=1e-3 * (1 + np.abs(phase).max(initial=0)))


# ------------------------------------------------------------------ model files
#: JSON paths of a model file's metadata (the last ones harmless), and values a damaged or hand-edited file may hold
METADATA_PATHS = [
    "network.width", "network.depth", "network.dropout", "network.in_channels", "network.heads",
    "geometry.energy_eV", "geometry.semiangle_cutoff_mrad", "geometry.detector_shape",
    "geometry.angular_sampling_mrad", "geometry.rolloff_mrad", "geometry.mask_threshold", "geometry.aberrations",
    "geometry.aberrations.C10", "geometry.aberrations.C99", "geometry.has_vacuum_probe", "geometry.wavelength_A",
    "geometry.sampling_A", "training_set", "training_set.electrons_range", "training_set.pool",
    "training_set.edge_width_range", "training_set.pool_step_range", "training_set.aberration_ranges", "network",
    "geometry", "name", "description", "training", "training.samples",
]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, 2, 3, 9, -1, 32, 10**30]),
    st.sampled_from([0.125, 0.5, 4.0, 300e3, 17.1, 2.0, 0.1, 1e-30, 1e35, -1.0, NAN, INF]),
    st.sampled_from(["", "x", "32"]), st.sampled_from([[], [32, 32], [32.0, 32.0], [2e4, 1e6], [1e6, 2e4], [NAN, 1]]),
    st.sampled_from([{}, {"C10": -100.0}, {"C10": [-200, 0], "C12": 50, "C21": 0, "C23": 0}]),
    st.just("<delete>"),
)
PAYLOAD_CHANGES = ["format", "format_version", "metadata text", "metadata number", "nan weight", "wrong weight shape",
                   "missing weight", "extra vacuum", "not a dict"]


@pytest.fixture(scope="module")
def model_file(tiny_model, tmp_path_factory):
    """A valid model file's bytes and payload, and a folder to write the damaged copies to."""
    folder = tmp_path_factory.mktemp("models")
    path = tiny_model.save(folder / "good.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return path.read_bytes(), payload, folder


def mutated_payload(payload: dict, field_path: str, value):
    metadata = json.loads(payload["metadata"])
    *parents, name = field_path.split(".")
    node = metadata
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
        if isinstance(value, str) and value == "<delete>":
            node.pop(name, None)
        else:
            node[name] = value
    return {**payload, "metadata": json.dumps(metadata)}


def changed_payload(payload: dict, change: str, value, cut: float):
    state = dict(payload["state_dict"])
    name = sorted(state)[int(cut * (len(state) - 1))]
    if change == "format":
        return {**payload, "format": "something-else"}
    if change == "format_version":
        return {**payload, "format_version": value if isinstance(value, (int, float)) else 99}
    if change in ("metadata text", "metadata number"):
        return {**payload, "metadata": "{not json" if change == "metadata text" else 3}
    if change == "nan weight":
        return {**payload, "state_dict": {**state, name: torch.full(state[name].shape, NAN)}}
    if change == "wrong weight shape":
        return {**payload, "state_dict": {**state, name: state[name].reshape(-1)[:1]}}
    if change == "missing weight":
        return {**payload, "state_dict": {k: v for k, v in state.items() if k != name}}
    if change == "extra vacuum":
        return {**payload, "vacuum_probe_intensity": torch.ones(32, 32)}
    return [payload]


@bounded(70)
@given(
    kind=st.sampled_from(["metadata", "metadata", "metadata", "truncate", "flip", "payload", "path"]),
    field_path=st.sampled_from(METADATA_PATHS),
    value=JSON_VALUES,
    cut=st.floats(0, 1),
    change=st.sampled_from(PAYLOAD_CHANGES),
    path_kind=st.sampled_from(["missing", "folder", "empty", "text"]),
)
@example(kind="metadata", field_path="network.depth", value=9, cut=0.0, change="format", path_kind="missing")
@example(kind="truncate", field_path="network.depth", value=9, cut=0.5, change="format", path_kind="missing")
def test_damaged_model_files_load_correctly_or_are_refused(model_file, kind, field_path, value, cut, change,
                                                           path_kind):
    """models.load_model on damaged files: a model whose network gives finite output for the declared geometry, or a
    ValueError/TypeError/OSError (FileNotFoundError) with a message, before anything large is built."""
    good, payload, folder = model_file
    path = folder / "damaged.pt"
    if kind == "metadata":
        torch.save(mutated_payload(payload, field_path, value), path)
    elif kind == "truncate":
        path.write_bytes(good[: int(cut * len(good))])
    elif kind == "flip":
        damaged = bytearray(good)
        damaged[min(int(cut * len(good)), len(good) - 1)] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif kind == "payload":
        torch.save(changed_payload(payload, change, value, cut), path)
    else:
        path = {"missing": folder / "nothing.pt", "folder": folder, "empty": folder / "empty.pt",
                "text": folder / "text.pt"}[path_kind]
        if path_kind == "empty":
            path.write_bytes(b"")
        elif path_kind == "text":
            path.write_text("a model\n")
    model = outcome(lambda: load_model(path), allowed=(ValueError, TypeError, OSError))
    if model is not None:
        geometry = model.geometry
        assert geometry.mask.any() and finite(np.abs(geometry.probe))
        out = model.network(torch.ones(1, model.network.in_channels, *geometry.detector_shape))
        assert out.shape == (1, 1, *geometry.detector_shape) and bool(torch.isfinite(out).all())


# ------------------------------------------------------------------ stitching
STITCH = {
    "j": ([2, 3, 4, 6, 9], [0, 1]),
    "patch": ([(8, 8), (5, 7)], [(1, 1)]),
    "full_mask": ([True, False], [False]),
    "mask_bits": (hnp.arrays(np.bool_, 64, elements=st.booleans(), fill=st.just(True)), [np.zeros(64, bool)]),
    "step": ([0.0, 0.5, 1.0, 2.5], [1e9, NAN]),
    "jitter": (hnp.arrays(np.float64, 18, elements=st.floats(0, 1)), []),
    "special": ([None, "nan outside", "inf outside"], ["nan inside", "inf inside", "1e35 inside", "1e300 inside"]),
    "dtype": ([np.float64, np.float32, np.int16], [np.bool_, np.complex128]),
    "offsets": ([None, "zeros"], ["nan", "short"]),
    "method": (["lsq", "relaxation"], ["exact"]),
    "min_overlap": ([0.25, 0.01], [0.0, NAN, 2.0]),
    "n_iter": ([3, 0], [-1, 2.5]),
    "relaxation_step": ([0.1, 1.0], [0.0, 2.0]),
    "tol": ([1e-8], [0.0, NAN]),
    "max_iter": ([1000, 1], [0]),
    "canvas": ([None, (40, 40)], [(0, 5), (10**6, 10**6)]),
}


def stitch_inputs(case: dict):
    """Patches (J, h, w) of the drawn dtype with a special value inside or outside the mask, positions on a 3×3
    grid of ``step`` pixels plus jitter, the mask and the given offsets."""
    j, (h, w) = case["j"], case["patch"]
    mask = np.ones((h, w), bool) if case["full_mask"] else case["mask_bits"][: h * w].reshape(h, w)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1).reshape(-1, 2)[:j]
    positions = grid * case["step"] + case["jitter"].reshape(9, 2)[:j]
    values = np.random.default_rng(j).uniform(-3, 3, (j, h, w))
    special = case["special"]
    if special is not None and j:
        cells = np.argwhere(~mask if special.endswith("outside") else mask)
        if len(cells):
            a, b = cells[len(cells) // 2]
            values[j // 2, a, b] = float(special.split()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patches = values.astype(case["dtype"])
    offsets = {None: None, "zeros": np.zeros(j), "nan": np.full(j, NAN), "short": np.zeros(max(j - 1, 0))}
    return patches, positions, mask, offsets[case["offsets"]]


@bounded(70)
@given(case=spoiled(STITCH))
@example(case={**{name: good[0] for name, (good, _) in STITCH.items() if isinstance(good, list)},
               "mask_bits": np.ones(64, bool), "jitter": np.zeros(18), "j": 2, "step": 1e6, "offsets": "zeros"})
def test_stitch_gives_a_finite_image_or_a_clear_error(case):
    """stitching.stitch: an image finite wherever a patch lands, finite offsets of shape (J,); or a ValueError/
    TypeError. Never a canvas larger than memory (the pinned example: positions 10⁶ pixels apart)."""
    patches, positions, mask, offsets = stitch_inputs(case)
    options = {"method": case["method"], "min_overlap": case["min_overlap"], "n_iter": case["n_iter"],
               "step": case["relaxation_step"], "tol": case["tol"], "max_iter": case["max_iter"]}
    result = outcome(lambda: stitch(patches, positions, mask, offsets=offsets, canvas_shape=case["canvas"],
                                    **options))
    if result is not None:
        assert result.image.ndim == 2 and result.image.shape == result.coverage.shape
        assert finite(result.image[result.coverage > 0]) and finite(result.coverage)
        assert result.offsets.shape == (len(patches),) and finite(result.offsets)


def test_stitch_options_refuse_bad_values():
    """StitchOptions with a non-number or NaN: a ValueError naming the field."""
    for name, value in (("n_iter", NAN), ("max_iter", "many"), ("min_overlap", "a"), ("step", None)):
        with pytest.raises(ValueError, match=name):
            StitchOptions(**{name: value})


# ------------------------------------------------------------------ small functions
@st.composite
def arrays_of(draw, dtypes: tuple[list, list], values: tuple[list, list], min_dims: tuple[int, int], max_dims=4):
    """An array of a good dtype and shape (at least ``min_dims[0]`` axes) with good values, or (spoiled) of a bad
    dtype, a bad shape (``min_dims[1]`` axes and up) or with one bad value; cast like a careless caller would."""
    spoil = draw(st.sets(st.sampled_from(["dtype", "shape", "value"]), max_size=1))
    dtype = draw(st.sampled_from(dtypes[1] if "dtype" in spoil else dtypes[0]))
    low = min_dims[1] if "shape" in spoil else min_dims[0]
    shape = draw(hnp.array_shapes(min_dims=low, max_dims=max(low, max_dims), min_side=0, max_side=5))
    elements = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from(values[0])))
    if "value" in spoil and elements.size:
        elements.reshape(-1)[draw(st.integers(0, elements.size - 1))] = draw(st.sampled_from(values[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return elements.astype(dtype)


@bounded(80)
@given(
    counts=arrays_of(([np.float32, np.float64, np.float16], [np.int64, np.uint8, np.bool_, np.complex64]),
                     ([0.0, 1.0, 3.0, 1e4, 1e-30, -1.0], [NAN, INF, 1e35]), min_dims=(2, 0)),
    options=spoiled({"electrons": ([1.0, 100.0, 1e-30, 1e35, "per pattern"], [0.0, -5.0, NAN, INF, "wrong length"]),
                     "tensor": ([True], [False])}, most=1),
)
def test_network_input_is_finite_or_refused(counts, options):
    """encoding.network_input: x = sqrt(counts⁺ / electrons × N_pixels), finite, ≥ 0, the shape of ``counts``, with
    Σx² = Σcounts⁺ × N_pixels / electrons per pattern, and ``counts`` unchanged; or a ValueError/TypeError."""
    before = counts.copy()
    electrons = options["electrons"]
    if electrons == "per pattern":
        electrons = torch.linspace(1, 2, counts.shape[0] if counts.ndim >= 3 else 1, dtype=torch.float64)
    elif electrons == "wrong length":
        electrons = torch.ones(7)
    tensor = torch.from_numpy(counts) if options["tensor"] else counts
    x = outcome(lambda: network_input(tensor, electrons))
    if x is not None:
        assert tuple(x.shape) == counts.shape and x.is_floating_point()
        assert bool(torch.isfinite(x).all()) and bool((x >= 0).all())
        e = torch.as_tensor(electrons, dtype=torch.float64).numpy().ravel()
        e = e.reshape(-1, *(1,) * (counts.ndim - 3)) if e.size > 1 else e.reshape(())
        expected = np.clip(counts.astype(np.float64), 0, None).sum((-2, -1)) * np.prod(counts.shape[-2:]) / e
        got = x.double().square().sum((-2, -1)).numpy()
        np.testing.assert_allclose(got, expected, rtol=5e-2 if x.dtype == torch.float16 else 1e-4, atol=1e-6)
    np.testing.assert_array_equal(counts, before)


@bounded(80)
@given(
    counts=arrays_of(([np.float32, np.float64, np.int64, np.uint16], [np.bool_, np.complex64, object]),
                     ([0, 1, 7, 1000], [1e19, 1e35, -1, 0.5, NAN, INF]), min_dims=(0, 0), max_dims=3),
    fraction=spoiled({"f": ([0.5, 1.0, 0.01, 1e-30], [0.0, 1.5, -0.5, NAN, INF, "half"])}, most=1),
    seed=st.integers(0, 3),
)
def test_thin_counts_keeps_whole_counts_or_refuses(counts, fraction, seed):
    """dose.thin_counts: float32 whole counts 0 ≤ thinned ≤ counts (all of them at fraction 1); or a clear error."""
    fraction = fraction["f"]
    thinned = outcome(lambda: thin_counts(counts, fraction, seed))
    if thinned is not None:
        assert thinned.shape == np.shape(counts) and thinned.dtype == np.float32 and finite(thinned)
        assert np.all(thinned == np.rint(thinned)) and np.all(thinned >= 0)
        assert np.all(thinned <= np.asarray(counts, np.float64) * (1 + 1e-6))
        if fraction == 1.0:
            np.testing.assert_allclose(thinned, counts, rtol=1e-6)


@bounded(80)
@given(case=spoiled({
    "scan_shape": (st.one_of(st.tuples(st.integers(1, 5), st.integers(1, 5)),
                             st.just((np.int64(3), np.int32(2)))),
                   [(0, 3), (-2, 2), (3.5, 2), (2,), (2, 2, 2), "3x3"]),
    "step": (st.one_of(st.sampled_from([0.3, (0.3, 0.2), (0.3,), 1e-30, 1e35]), st.floats(1e-3, 1e3)),
             [0.0, -1.0, NAN, INF, "0.3", (0.3, NAN)]),
    "rotation": (st.one_of(st.sampled_from([0.0, 30.0, -720.0]), st.floats(-1e3, 1e3)), [NAN, INF]),
    "transpose": ([False, True], []),
}))
def test_scan_positions_are_a_finite_grid_or_refused(case):
    """scan.scan_positions: (Rx·Ry, 2) finite float64 positions whose nearest neighbours lie one step apart; or a
    ValueError/TypeError."""
    scan_shape, step = case["scan_shape"], case["step"]
    positions = outcome(lambda: scan_positions(scan_shape, step, case["rotation"], case["transpose"]))
    if positions is not None:
        rx, ry = scan_shape
        steps = np.broadcast_to(np.ravel(step), 2)
        assert positions.shape == (rx * ry, 2) and positions.dtype == np.float64 and finite(positions)
        grid = positions.reshape(rx, ry, 2)
        if ry > 1:  # py4DSTEM rotates in float32
            np.testing.assert_allclose(np.linalg.norm(grid[0, 1] - grid[0, 0]), steps[1], rtol=1e-6)
        if rx > 1:
            np.testing.assert_allclose(np.linalg.norm(grid[1, 0] - grid[0, 0]), steps[0], rtol=1e-6)


def vacuum_case(kind: str):
    k = np.arange(32) - 16
    disk = (np.hypot(k[:, None], k[None, :]) < 8).astype(np.float64)
    return {
        "disk": disk, "zeros": np.zeros((32, 32)), "nan": np.where(disk > 0, NAN, 0.0), "negative": -disk,
        "uniform": np.ones((32, 32)), "wrong shape": disk[:31], "4-D": np.broadcast_to(disk, (2, 2, 32, 32)),
        "path": "vacuum.npy", "complex": disk.astype(np.complex128), "bool": disk > 0, "3-D": np.ones((2, 32, 32)),
    }[kind]


GEOMETRY = {
    "energy": ([300e3, 80e3, 1e35, 1e300], [0.0, -1.0, NAN, INF, "300 kV"]),
    "semiangle": ([17.1, 25.0, 10.0], [2.0, 0.0, 1e-30, 1e35, -1.0, NAN, INF]),
    "detector_shape": ([(32, 32), (64, 48), (31, 33)],
                       [(8, 8), (7, 32), (0, 0), (-32, 32), (32.5, 32), (32,), "32", (10**9, 10**9), (1e35, 1e35)]),
    "sampling": ([("angular", 2.0), ("reciprocal", 0.1)],
                 [("both", 2.0), ("neither", None), *[("angular", v) for v in (0.0, 1e-30, 1e35, -1.0, NAN, INF)]]),
    "aberrations": ([None, {"C10": -100.0}, {"C12": 20.0, "phi12": 0.5}, {"defocus": 50.0}],
                    [{"C10": 1e35}, {"C10": NAN}, {"Cs": 1.0}, {"C10": "a"}, [("C10", 1.0)], "C10=-100"]),
    "rolloff": ([2.0, 0.0], [-1.0, NAN, 1e35]),
    "mask_threshold": ([0.16, 0.1, 1e-30], [0.0, 1.0, NAN]),
    "vacuum": ([None, "disk", "4-D"], ["zeros", "nan", "negative", "uniform", "wrong shape", "path", "complex"]),
}
GOOD_GEOMETRY = {name: good[0] for name, (good, _) in GEOMETRY.items()}


@bounded(60)
@given(case=spoiled(GEOMETRY))
@example(case={**GOOD_GEOMETRY, "vacuum": "uniform"})  # an aperture that fills the detector
@example(case={**GOOD_GEOMETRY, "detector_shape": (10**9, 10**9)})  # a detector too large to build
def test_probe_geometry_is_consistent_or_refused(case):
    """ProbeGeometry(...): a finite, unit-norm probe of ``detector_shape`` with a non-empty mask and oversampling ≥ 2;
    or a ValueError/TypeError."""
    kind, value = case["sampling"]
    keywords = {"angular": {"angular_sampling": value}, "reciprocal": {"reciprocal_sampling": value},
                "both": {"angular_sampling": value, "reciprocal_sampling": 0.1}, "neither": {}}[kind]
    vacuum = None if case["vacuum"] is None else vacuum_case(case["vacuum"])
    g = outcome(lambda: ProbeGeometry(
        case["energy"], case["semiangle"], detector_shape=case["detector_shape"], aberrations=case["aberrations"],
        rolloff=case["rolloff"], mask_threshold=case["mask_threshold"], vacuum_probe_intensity=vacuum, **keywords,
    ))
    if g is not None:
        assert g.probe.shape == g.detector_shape == tuple(int(n) for n in case["detector_shape"])
        assert finite(np.abs(g.probe)) and np.sum(np.abs(g.probe) ** 2) == pytest.approx(1, rel=1e-6)
        assert g.mask.dtype == bool and g.mask.any() and g.oversampling_ratio >= 2
        assert all(math.isfinite(v) for v in (g.wavelength, *g.sampling, g.angular_sampling))


@pytest.mark.parametrize("kind", ["path", "zeros", "nan", "negative", "complex", "bool", "3-D"])
def test_bad_vacuum_probes_are_refused_by_name(clean, tiny_model, kind):
    """A vacuum probe given as a path, all zeros, NaN, negative, complex, bool or 3-D: a TypeError/ValueError naming
    vacuum_probe_intensity, from ProbeGeometry and from the reconstruction; a measured disk is accepted."""
    bad = vacuum_case(kind)
    with pytest.raises((TypeError, ValueError), match="vacuum_probe_intensity"):
        ProbeGeometry(300e3, 17.1, angular_sampling=2.0, vacuum_probe_intensity=bad)
    recon = DeepCDIReconstruction(clean[:4, :4], 300e3, 17.1, C10=-100.0, C12=20.0, phi12=0.5, model=tiny_model,
                                  scan_step=0.3, angular_sampling=2.0, rotation_deg=0.0, transpose=False,
                                  verbose=False, vacuum_probe_intensity=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError), match="vacuum_probe_intensity"):
            recon.preprocess()
    ProbeGeometry(300e3, 17.1, angular_sampling=2.0, vacuum_probe_intensity=vacuum_case("disk"))
