"""The ``sttp`` command line: user mistakes end in one line ``sttp: error: …`` (exit status 2) before any work and
leave nothing behind; ranks in flags and config files follow the API's rule; every run ends with a summary line."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torch_sttp import cli
from torch_sttp.checkpoint import load_checkpoint
from torch_sttp.options import check_rank

CLASSIFY = ["train", "classify", "--dataset", "digits8x8", "--model", "small-cnn", "--width", "4", "--batch", "32",
            "--threads", "1", "--no-progress"]
GAN_BASE = ["train", "gan", "--dataset", "mnist5k", "--ngf", "8", "--ndf", "8", "--nz", "8", "--batch-size", "4",
            "--n-dis", "1", "--log-every", "1", "--metrics", "none", "--threads", "1", "--no-progress"]
GAN = GAN_BASE + ["--d-rank", "4"]


def _files(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def _user_error(argv, capsys, root) -> str:
    """Run ``sttp argv``; it must exit with status 2 and one stderr line ``sttp: error: …``, creating or touching
    no file under ``root``. Returns that line."""
    before = _files(root)
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("sttp: error: "), err
    assert _files(root) == before, "the failed command wrote files"
    return lines[0]


# ---------------------------------------------------------------------------------------------------- report
def test_report_rank_zero(capsys, tmp_path):
    line = _user_error(["report", "small-cnn", "--rank", "0"], capsys, tmp_path)
    assert "rank must be a positive integer, got 0" in line


def test_report_exclude_that_matches_nothing(capsys, tmp_path):
    line = _user_error(["report", "small-cnn", "--exclude", "nomatch"], capsys, tmp_path)
    assert "'nomatch' matches no module" in line and "conv1" in line


def test_report_unknown_model(capsys, tmp_path):
    line = _user_error(["report", "no-such-model"], capsys, tmp_path)
    assert "no-such-model" in line and "small-cnn" in line


def test_usage_error_of_argparse_is_one_line(capsys, tmp_path):
    line = _user_error(["train", "classify", "--method", "magic"], capsys, tmp_path)
    assert "--method" in line and "'magic'" in line and "--help" in line


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        cli.main(["report", "small-cnn", "--rank", "0", "--debug"])


# -------------------------------------------------------------------------------------------- train classify
def test_classify_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nonexistent.yaml"
    line = _user_error(CLASSIFY + ["--config", missing, "--out", tmp_path / "run"], capsys, tmp_path)
    assert str(missing) in line and "--config" in line


@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "0", "steps must be an integer ≥ 1, got 0 (flag --steps"),
    ("--lr", "-1", "lr must be a number > 0, got -1.0 (flag --lr"),
    ("--threads", "-4", "threads must be an integer ≥ 1, got -4 (flag --threads"),
    ("--eval-batch", "0", "eval_batch must be an integer ≥ 1, got 0 (flag --eval-batch"),
    ("--device", "cuda:99" if torch.cuda.is_available() else "cuda", "device"),
], ids=["steps-0", "lr-negative", "threads-negative", "eval-batch-0", "device"])
def test_classify_bad_flag_is_refused_before_training(capsys, tmp_path, flag, value, expected):
    line = _user_error(CLASSIFY + ["--steps", "2", flag, value, "--out", tmp_path / "run"], capsys, tmp_path)
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_classify_exclude_that_matches_nothing(capsys, tmp_path):
    line = _user_error(CLASSIFY + ["--method", "sttp", "--steps", "1", "--exclude", "nomatch", "--out",
                                   tmp_path / "run"], capsys, tmp_path)
    assert "'nomatch' matches no module" in line and not (tmp_path / "run").exists()


def test_classify_resume_into_a_folder_with_other_settings(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(CLASSIFY + ["--method", "svdp", "--rank", "2", "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    line = _user_error(CLASSIFY + ["--method", "svdp", "--rank", "3", "--steps", "1", "--out", run], capsys,
                       tmp_path)
    assert "different settings" in line and "rank: 2 → 3" in line and "--no-resume" in line
    assert load_checkpoint(run / "checkpoint.pt")["config"]["rank"] == 2


def test_classify_missing_data(capsys, tmp_path):
    line = _user_error(CLASSIFY + ["--dataset", "cifar10", "--model", "wrn", "--data-root", tmp_path / "nowhere",
                                   "--out", tmp_path / "run"], capsys, tmp_path)
    assert "--data-root" in line and "cifar-10-batches-bin" in line and str(tmp_path / "nowhere") in line


# ------------------------------------------------------------------------------------------------- train gan
@pytest.mark.parametrize("flag, value, expected", [
    ("--steps", "0", "steps must be an integer ≥ 1, got 0 (flag --steps"),
    ("--lr", "-1", "lr must be a number > 0, got -1.0 (flag --lr"),
    ("--threads", "-4", "threads must be an integer ≥ 1, got -4 (flag --threads"),
    ("--n-dis", "0", "n_dis must be an integer ≥ 1, got 0 (flag --n-dis"),
    ("--beta2", "1.5", "beta2 must be a number in [0, 1), got 1.5 (flag --beta2"),
    ("--metrics", "fid,mystery", "unknown metrics ['mystery']"),
], ids=["steps-0", "lr-negative", "threads-negative", "n-dis-0", "beta2", "metrics"])
def test_gan_bad_flag_is_refused_before_training(capsys, tmp_path, flag, value, expected):
    line = _user_error(GAN + ["--steps", "2", flag, value, "--out", tmp_path / "run"], capsys, tmp_path)
    assert expected in line and not (tmp_path / "run").exists()


def test_gan_missing_data(capsys, tmp_path):
    line = _user_error(GAN + ["--dataset", "stl10", "--data-root", tmp_path / "nowhere", "--out", tmp_path / "run"],
                       capsys, tmp_path)
    assert "--data-root" in line and "stl10_binary" in line and str(tmp_path / "nowhere") in line


def test_gan_resume_into_a_folder_with_other_settings(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(GAN + ["--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    line = _user_error(GAN + ["--steps", "1", "--lr", "0.001", "--out", run], capsys, tmp_path)
    assert "different settings" in line and "lr: 0.0002 → 0.001" in line


# ------------------------------------------------------------------------------------------ ranks (item 12)
@pytest.mark.parametrize("value", [2.5, 4.0, 0, "four"])
def test_rank_in_a_config_file_is_checked_like_the_api(capsys, tmp_path, value):
    with pytest.raises(ValueError) as api:
        check_rank(value)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"method": "sttp", "rank": value}))
    line = _user_error(CLASSIFY + ["--config", config, "--steps", "1", "--out", tmp_path / "run"], capsys, tmp_path)
    assert line == f"sttp: error: {api.value}"


@pytest.mark.parametrize("text, value", [("2.5", 2.5), ("4.0", 4.0), ("-3", -3)])
def test_rank_flag_is_checked_like_the_api(capsys, tmp_path, text, value):
    with pytest.raises(ValueError) as api:
        check_rank(value)
    line = _user_error(CLASSIFY + ["--method", "sttp", "--rank", text, "--steps", "1", "--out", tmp_path / "run"],
                       capsys, tmp_path)
    assert line == f"sttp: error: {api.value}"
    assert _user_error(["report", "small-cnn", "--rank", text], capsys, tmp_path) == line


def test_gan_ranks_in_config_and_flags_are_checked_like_the_api(capsys, tmp_path):
    with pytest.raises(ValueError) as api:
        check_rank(2.5)
    config = tmp_path / "gan.yaml"
    config.write_text("d: sttp-c\nd_rank: 2.5\n")
    line = _user_error(GAN_BASE + ["--config", config, "--steps", "1", "--out", tmp_path / "run"], capsys,
                       tmp_path)
    assert line.startswith("sttp: error: d_rank: ") and str(api.value) in line
    line = _user_error(GAN + ["--g", "sttp-c", "--g-rank", "4.0", "--steps", "1", "--out", tmp_path / "run"], capsys,
                       tmp_path)
    assert "g_rank: rank must be a positive integer, got 4.0" in line


def test_integer_settings_in_a_config_file_are_not_truncated(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 2.5\n")
    line = _user_error(CLASSIFY + ["--config", config, "--out", tmp_path / "run"], capsys, tmp_path)
    assert "steps must be an integer ≥ 1, got 2.5" in line


def test_integer_ranks_from_flags_and_files_train(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("method: sttp\nrank: 3\n")
    assert cli.main(CLASSIFY + ["--config", str(config), "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(CLASSIFY + ["--method", "sttp", "--rank", "+3", "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    ranks = [json.loads((tmp_path / d / "summary.json").read_text())["rank"] for d in ("a", "b")]
    assert ranks == [3, 3]


# --------------------------------------------------------------------------------------- compress / export
def _small_model():
    return nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 12))


@pytest.fixture
def dense_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dense.pt"
    torch.save(_small_model().state_dict(), path)
    return path


COMPRESS = ["compress", "--constructor", "tests.test_cli:_small_model", "--method", "svdp", "--quiet"]


def test_compress_missing_model_file(capsys, tmp_path):
    line = _user_error(["compress", "--model", tmp_path / "missing.pt", "--budget", "0.3", "--output",
                        tmp_path / "out.pt"], capsys, tmp_path)
    assert str(tmp_path / "missing.pt") in line and "does not exist" in line


@pytest.mark.parametrize("constructor, kwargs, expected", [
    ("no_such_package.module:build", None, "cannot import module 'no_such_package.module'"),
    ("torch.nn:NoSuchLayer", None, "has no attribute 'NoSuchLayer'"),
    ("torch.nn.Linear", None, "must look like package.module:callable"),
    ("torch.nn:Linear", "{in_features: 3}", "--constructor-kwargs is not valid JSON"),
    ("torch.nn:Linear", "[3, 2]", "must be a JSON object"),
    ("torch.nn:Linear", '{"in_features": 24, "colour": 1}', "colour"),
], ids=["module", "attribute", "form", "json-syntax", "json-not-an-object", "unexpected-keyword"])
def test_compress_bad_constructor_or_kwargs(capsys, tmp_path, dense_file, constructor, kwargs, expected):
    extra = ["--constructor-kwargs", kwargs] if kwargs is not None else []
    line = _user_error(["compress", "--model", dense_file, "--constructor", constructor, *extra, "--budget", "0.3",
                        "--output", tmp_path / "out.pt"], capsys, tmp_path)
    assert expected in line


@pytest.mark.parametrize("budget", ["0", "1.5", "abc"])
def test_compress_bad_budget(capsys, tmp_path, dense_file, budget):
    line = _user_error(COMPRESS + ["--model", dense_file, "--budget", budget, "--output", tmp_path / "out.pt"],
                       capsys, tmp_path)
    assert f"budget {budget!r}" in line and "(0, 1]" in line and "DOF count" in line


def test_compress_threads_negative(capsys, tmp_path, dense_file):
    line = _user_error(COMPRESS + ["--model", dense_file, "--budget", "0.3", "--threads", "-4", "--output",
                                   tmp_path / "out.pt"], capsys, tmp_path)
    assert "--threads must be ≥ 1, got -4" in line


def test_export_of_an_svd_checkpoint_as_dense(capsys, tmp_path, dense_file):
    compressed = tmp_path / "svd.pt"
    assert cli.main(["compress", "--model", str(dense_file), "--constructor", "tests.test_cli:_small_model",
                     "--method", "svd", "--budget", "0.4", "--quiet", "--output", str(compressed)]) == 0
    line = _user_error(["export", "--input", compressed, "--model", dense_file, "--constructor",
                        "tests.test_cli:_small_model", "--format", "dense", "--output", tmp_path / "dense-out.pt"],
                       capsys, tmp_path)
    assert "factorized checkpoint" in line and "--format factorized" in line


def test_a_state_dict_that_does_not_fit_the_model_is_one_line(capsys, tmp_path, dense_file):
    wide = tmp_path / "wide.pt"
    torch.save(nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 12)).state_dict(), wide)
    line = _user_error(COMPRESS + ["--model", wide, "--budget", "0.5", "--output", tmp_path / "out.pt"],
                       capsys, tmp_path)
    assert "wide.pt does not fit the model of --constructor tests.test_cli:_small_model" in line
    assert "size mismatch for 0.weight" in line
    compressed = tmp_path / "c.pt"
    assert cli.main(COMPRESS + ["--model", str(dense_file), "--budget", "0.5", "--quiet",
                                "--output", str(compressed)]) == 0
    capsys.readouterr()
    line = _user_error(["export", "--input", compressed, "--model", wide, "--constructor",
                        "tests.test_cli:_small_model", "--output", tmp_path / "o.pt"], capsys, tmp_path)
    assert "wide.pt does not fit" in line


def test_export_missing_input(capsys, tmp_path, dense_file):
    line = _user_error(["export", "--input", tmp_path / "missing.pt", "--model", dense_file, "--constructor",
                        "tests.test_cli:_small_model", "--output", tmp_path / "o.pt"], capsys, tmp_path)
    assert str(tmp_path / "missing.pt") in line


# ---------------------------------------------------------------------------------- summary line (item 14)
def test_classify_ends_with_a_summary_line_and_says_when_already_complete(capsys, tmp_path):
    run = tmp_path / "run"
    argv = CLASSIFY + ["--method", "sttp", "--rank", "2", "--steps", "2", "--out", str(run)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((run / "summary.json").read_text())
    assert len(out) == 1 and out[0].startswith("classify sttp: complete after 2/2 steps: ")
    assert f"test accuracy {summary['accuracy']:.4f}" in out[0] and f"Z {summary['z']:.2f} %" in out[0]
    assert out[0].endswith(f"run folder {run}")
    assert cli.main(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert len(again) == 1 and "already complete (2/2 steps" in again[0]
    assert again[0].split(": ", 2)[2] == out[0].split(": ", 2)[2]  # the same final metrics and folder


def test_classify_interrupted_run_says_how_to_resume(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(CLASSIFY + ["--steps", "3", "--stop-at", "1", "--out", str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert "interrupted after 1/3 steps" in line and "run the same command again" in line
    assert line.endswith(f"run folder {run}")


def test_gan_ends_with_a_summary_line_and_says_when_already_complete(capsys, tmp_path):
    run = tmp_path / "run"
    argv = GAN + ["--d", "sttp-c", "--steps", "2", "--ckpt-every", "1", "--out", str(run)]
    assert cli.main(argv + ["--stop-after", "1"]) == 0
    stopped = capsys.readouterr().out.strip().splitlines()
    assert len(stopped) == 1 and "stopped after 1/2 generator steps" in stopped[0]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((run / "summary.json").read_text())
    assert len(out) == 1 and out[0].startswith("gan sttp-c: finished after 2/2 generator steps: ")
    assert f"Z_D {summary['z_d']:.1f} %" in out[0] and out[0].endswith(f"run folder {run}")
    assert cli.main(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert len(again) == 1 and "already complete (2/2 generator steps" in again[0]


@pytest.fixture
def garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    return path


@pytest.mark.parametrize("where", ["model", "calibration", "export-input"])
def test_a_damaged_safetensors_file_is_one_line_naming_it(capsys, tmp_path, dense_file, garbage_safetensors, where):
    if where == "model":
        argv = COMPRESS + ["--model", garbage_safetensors, "--budget", "0.3", "--output", tmp_path / "o.pt"]
    elif where == "calibration":
        argv = COMPRESS + ["--model", dense_file, "--budget", "0.3", "--calibration", garbage_safetensors,
                           "--output", tmp_path / "o.pt"]
    else:
        argv = ["export", "--input", garbage_safetensors, "--model", dense_file, "--constructor",
                "tests.test_cli:_small_model", "--output", tmp_path / "e.pt"]
    line = _user_error(argv, capsys, tmp_path)
    assert "garbage.safetensors" in line and "is not a readable safetensors file" in line and "write it again" in line


@pytest.mark.parametrize("flag", ["--output", "--report"])
def test_an_output_below_a_file_is_refused_before_the_model_is_read(capsys, tmp_path, dense_file, flag):
    paths = {"--output": tmp_path / "o.pt", "--report": tmp_path / "o.json"}
    paths[flag] = dense_file / "x.pt"
    line = _user_error(COMPRESS + ["--model", tmp_path / "missing.pt", "--budget", "0.3", "--output",
                                   paths["--output"], "--report", paths["--report"]], capsys, tmp_path)
    assert f"{flag} {dense_file / 'x.pt'}: {dense_file} is a file, not a folder" in line


def test_budget_one_is_the_whole_dense_count_and_svd_refuses_a_spectrum(capsys, tmp_path, dense_file):
    from torch_sttp.experiments.compress_cli import parse_budget

    assert parse_budget("1") == 1.0 and isinstance(parse_budget("1"), float) and parse_budget("2") == 2
    line = _user_error(["compress", "--model", dense_file, "--constructor", "tests.test_cli:_small_model",
                        "--method", "svd", "--spectrum", "identity", "--budget", "0.3", "--output",
                        tmp_path / "o.pt"], capsys, tmp_path)
    assert "--method svd writes two plain factors, which keep no spectrum" in line


@pytest.mark.parametrize("method", ["svdp", "svd"])
def test_the_compress_report_gives_z_of_the_model_it_wrote(capsys, tmp_path, dense_file, method):
    """The JSON report (and the printed line) carry eq. 11's Z of the whole written model and the layers left dense."""
    from torch_sttp import compression
    from torch_sttp.experiments.compress_cli import build_compressed

    out = tmp_path / "c.pt"
    assert cli.main(["compress", "--model", str(dense_file), "--constructor", "tests.test_cli:_small_model",
                     "--method", method, "--budget", "0.3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    comp = json.loads((tmp_path / "c.pt.json").read_text())["compression"]
    dense = _small_model()
    assert comp["params_dense"] == sum(v.numel() for v in dense.state_dict().values())
    rebuilt = build_compressed(_small_model(), out)
    if method == "svdp":
        assert comp["z"] == pytest.approx(compression(rebuilt))
    else:
        assert comp["params_compressed"] == sum(v.numel() for v in rebuilt.state_dict().values())
    assert comp["skipped"] == [] and f"Z = {comp['z']:.4g}%" in printed
