"""Options are defined once (virnucpro/options.py): the CLI and the keyword API are built from the same
fields, and out-of-range values are refused in one line before Ray or any model starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import create_parser, main
from virnucpro.options import OUTPUT_OPTIONS, TABLE_OPTIONS, EmbedOptions, OptionError, PredictOptions, from_args

ROOT = Path(__file__).resolve().parent.parent


def _cli_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata["cli"]}


@pytest.mark.parametrize("command", ["embed", "predict"])
def test_every_option_has_a_flag_and_defaults_match_the_api(command):
    argv = [command, "in.fa", "-o", "out"] + (["--model", "m"] if command == "embed" else
                                             ["--classifier", "c.pth", "--chunk-size", "500"])
    args = create_parser().parse_args(argv)
    # predict reads the default embedding column: embed's output-column options are not among its flags;
    # nor is --service (predict names one per model: --esm-service, --dnabert-service)
    expected = _cli_fields(EmbedOptions) - ({*OUTPUT_OPTIONS, *TABLE_OPTIONS, "service"} if command == "predict" else set())
    assert expected <= set(vars(args))
    assert command == "embed" or ("service" not in vars(args) and {"esm_service", "dnabert_service"} <= set(vars(args)))
    assert command == "embed" or not set(OUTPUT_OPTIONS) & set(vars(args))
    assert from_args(EmbedOptions, args) == EmbedOptions()  # the parser's defaults are the dataclass's
    if command == "predict":
        assert from_args(PredictOptions, args) == PredictOptions()


def test_flags_reach_the_options():
    args = create_parser().parse_args(
        ["embed", "in.fa", "-o", "out", "--model", "m", "--toks-per-batch", "8192", "--no-pin-memory",
         "--no-progress", "--compile", "--gpus-per-actor", "0.5", "-v", "--attention", "flex"])
    opts = from_args(EmbedOptions, args)
    assert (opts.toks_per_batch, opts.pin_memory, opts.progress, opts.compile, opts.gpus_per_actor,
            opts.verbose, opts.attention) == (8192, False, False, True, 0.5, True, "flex")


@pytest.mark.parametrize("field,value,message", [
    ("truncation_seq_length", 0, "--truncation-seq-length 0: must be at least 1"),
    ("truncation_seq_length", -5, "--truncation-seq-length -5: must be at least 1"),
    ("num_actors", 0, "--num-actors 0: must be at least 1"),
    ("toks_per_batch", 0, "--toks-per-batch 0: must be at least 1"),
    ("cuda_streams", 0, "--cuda-streams 0: must be at least 1"),
    ("dataloader_workers", 0, "--dataloader-workers 0: must be at least 1"),
    ("gpus_per_actor", 1.5, "--gpus-per-actor 1.5: give a fraction of one GPU (0.5) or a whole number"),
    ("gpus_per_actor", -1.0, "--gpus-per-actor -1.0: must be at least 0"),
    ("dtype", "fp8", "--dtype fp8: choose from auto, float32, bfloat16, float16"),
    ("include", ("mean", "foo"), "--include mean foo: foo is not one of mean, bos, cls, per-token, logits"),
    ("actor_wait_seconds", 0.0, "--actor-wait-seconds 0.0: must be positive"),
    ("max_actor_restarts", -2, "--max-actor-restarts -2: must be at least -1"),
])
def test_out_of_range_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(OptionError) as info:
        EmbedOptions(**{field: value})
    assert str(info.value) == message


def test_predict_options_are_checked_too():
    with pytest.raises(OptionError, match=r"--threshold 1.5: must be within \[0, 1\]"):
        PredictOptions(threshold=1.5)
    with pytest.raises(OptionError, match="--resume and --overwrite exclude each other"):
        EmbedOptions(resume=True, overwrite=True)


@pytest.mark.parametrize("flag", [["--truncation-seq-length", "0"], ["--truncation-seq-length", "-5"],
                                  ["--num-actors", "0"]])
def test_cli_refuses_before_anything_starts(tmp_path, capsys, flag):
    """Tried as a new user would: no Ray, no model, no output directory; exit 2 with one line."""
    out = tmp_path / "out"
    start = time.perf_counter()
    code = main(["embed", str(tmp_path / "missing.faa"), "-o", str(out), "--model", "nope", *flag])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{flag[0]} {flag[1]}: must be at least 1" in err
    assert not out.exists() and time.perf_counter() - start < 5


def test_help_is_fast_and_imports_neither_torch_nor_ray():
    code = ("import sys, time; t = time.perf_counter(); from cluster.cli import create_parser; "
            "create_parser().format_help(); print(time.perf_counter() - t, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    seconds, torch_loaded, ray_loaded = out.split()
    assert torch_loaded == "False" and ray_loaded == "False"
    assert float(seconds) < 1.0


@pytest.mark.parametrize("flags,message", [
    (["--replicas", "2", "--max-replicas", "4"], "give --replicas N (a fixed number) or --min-replicas/--max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 --max-replicas 2: need 0 <= min <= max"),
    (["--max-replicas", "0"], "--min-replicas 1 --max-replicas 0: need 0 <= min <= max"),
    (["--replicas", "0"], "--replicas 0: must be at least 1"),
    (["--request-timeout", "0"], "--request-timeout 0.0: seconds, more than 0"),
    (["--min-replicas", "0", "--downscale-delay", "-1"], "--upscale-delay and --downscale-delay: seconds, at least 0"),
])
def test_serve_start_refuses_bad_sizes_before_joining_ray(capsys, flags, message):
    code = main(["serve", "start", "--model", "nope", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_serve_start_flags_reach_the_autoscaling_and_limits():
    from cluster.cli import _limits, _scaling
    from cluster.service import Scaling

    def parsed(*flags):
        return create_parser().parse_args(["serve", "start", "--model", "m", *flags])

    assert _scaling(parsed()) is None and _scaling(parsed("--replicas", "3")) is None
    assert _scaling(parsed("--min-replicas", "0", "--max-replicas", "4", "--upscale-delay", "5",
                           "--downscale-delay", "60")) == Scaling(0, 4, 5.0, 60.0)
    assert _scaling(parsed("--max-replicas", "3")) == Scaling(1, 3)  # from one replica up
    assert _scaling(parsed("--min-replicas", "2")) == Scaling(2, 2)
    assert _limits(parsed("--request-timeout", "45")).request_timeout_s == 45.0
    assert Scaling(0, 2, look_back_s=1).serve_config(target=3) == {
        "min_replicas": 0, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 3,
        "upscale_delay_s": 30.0, "downscale_delay_s": 600.0, "look_back_period_s": 1}
