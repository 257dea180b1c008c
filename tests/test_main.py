"""The command line: config overrides, and one-line errors (no traceback) for bad ones."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, config="configs/digits.py"):
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(proc):
    """The one line the user sees: the last non-empty line of stderr."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize(
    "override, expected",
    [  # what the line must name: the key, the bad value, the fix (wording free)
        ("--config.training.batchsize=64", ("'training.batchsize'", "did you mean training.batch_size?")),
        ("--config.nope.x=1", ("'nope.x'", "configs/base.py")),
        ("--config.training.batch_size=abc", ("'training.batch_size'", "'abc'", "integer")),
        ("--config.optim.lr=fast", ("'optim.lr'", "'fast'", "a number")),
        ("--config.training.num_steps=many", ("'training.num_steps'", "'many'", "integer")),
        ("--config.model.remat=maybe", ("'model.remat'", "'maybe'", "True or False")),
        # config_flags itself takes this one (as (1, 'a')); the check after parsing does not.
        ("--config.model.ch_mult=(1,a)", ("'model.ch_mult'", "'(1,a)'", "a tuple like (1, 2)")),
    ],
)
def test_bad_override_exits_with_one_line_naming_the_key(tmp_path, override, expected):
    proc = _run(tmp_path, override)
    assert proc.returncode != 0
    line = _error_line(proc)
    assert line.startswith("error: ")
    for part in expected:
        assert part in line, line
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_bad_value_found_at_run_time_is_one_line(tmp_path):
    proc = _run(tmp_path, "--config.training.nonfinite=sometimes")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "training.nonfinite='sometimes'" in line and "error" in line and "skip" in line


def test_missing_config_file_and_workdir(tmp_path):
    proc = _run(tmp_path, config="configs/does_not_exist.py")
    assert proc.returncode != 0 and "does_not_exist.py" in _error_line(proc)
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--workdir is required" in proc.stderr


@pytest.mark.parametrize("source, expected", [  # the file, where or what went wrong, the fix
    ("def get_config(:\n", ("broken.py", "line 1", "fix the file")),
    ("def get_config():\n    return 1 / 0\n", ("broken.py", "ZeroDivisionError")),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, source, expected):
    path = tmp_path / "broken.py"
    path.write_text(source)
    for extra in ((), ("--config.seed=1",)):  # config_flags loads it at parse time, or at first use
        proc = _run(tmp_path / "w", *extra, config=str(path))
        assert proc.returncode == 2
        line = _error_line(proc)
        assert line.startswith("error: --config=") and all(part in line for part in expected), proc.stderr[-2000:]
        assert not os.path.exists(tmp_path / "w")


def test_print_config_lists_every_field_with_its_comment(tmp_path):
    proc = _run(tmp_path, "--print_config", "--config.training.batch_size=64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(re.match(r"^training\.batch_size = 64 +# Global batch over all devices and hosts\.$", ln)
               for ln in lines), lines
    assert any(ln.startswith("training.dispatch_loop = 'auto'") and "lax.scan" in ln for ln in lines)
    assert len(lines) >= 80 and not os.path.exists(tmp_path / "config.json")  # every field, one a line


# ---- a workdir of the other kind ----------------------------------------------------------------

DDPM_TINY = ["--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
             "--config.diffusion.num_timesteps=10", "--config.training.num_steps=2",
             "--config.training.sample_every=0", "--config.training.eval_bpd_after=False"]
AE_TINY = ["--config.data.source=digits", "--config.data.image_size=8",
           "--config.autoencoder.block_out_channels=(16,16)", "--config.autoencoder.layers_per_block=1",
           "--config.autoencoder.latent_channels=2", "--config.autoencoder.norm_num_groups=8",
           "--config.autoencoder.batch_size=16", "--config.autoencoder.num_steps=2",
           "--config.autoencoder.checkpoint_every=2", "--config.autoencoder.eval_batch_size=100",
           "--config.autoencoder.warmup_steps=0", "--config.autoencoder.eval_classifier=False"]


@pytest.fixture(scope="module")
def two_workdirs(tmp_path_factory):
    """A tiny DDPM workdir and a tiny autoencoder workdir, trained through the command line."""
    root = tmp_path_factory.mktemp("kinds")
    ddpm = _run(root / "ddpm", *DDPM_TINY, "--config.training.checkpoint_every=1")  # steps 1 and 2
    ae = _run(root / "ae", "--mode=train_autoencoder", *AE_TINY, config="configs/autoencoder_mnist.py")
    assert ddpm.returncode == 0 and ae.returncode == 0, (ddpm.stderr[-2000:], ae.stderr[-2000:])
    return root / "ddpm", root / "ae", ddpm.stdout


@pytest.mark.parametrize("mode", ["sample", "train"])
def test_a_ddpm_command_on_an_autoencoder_workdir_says_what_it_holds(two_workdirs, mode, checksums):
    _, ae, _ = two_workdirs
    before = checksums(ae)
    proc = _run(ae, f"--mode={mode}", *DDPM_TINY)
    assert proc.returncode == 1
    assert _error_line(proc) == (
        f"error: {ae} holds an autoencoder (--mode=train_autoencoder or convert --autoencoder-kl), not a DDPM; "
        f"continue it with --mode=train_autoencoder, or train a DDPM on its latents with "
        f"--config.data.latents_from={ae} and a new --workdir.")
    assert checksums(ae) == before


def test_the_autoencoder_mode_on_a_ddpm_workdir_says_what_it_holds(two_workdirs, checksums):
    ddpm, _, _ = two_workdirs
    before = checksums(ddpm)
    proc = _run(ddpm, "--mode=train_autoencoder", *AE_TINY, config="configs/autoencoder_mnist.py")
    assert proc.returncode == 1
    assert _error_line(proc) == (
        f"error: {ddpm} holds a DDPM (unet network), not an autoencoder; sample or evaluate it with --mode=sample "
        "/ eval / bpd and its config, or give --mode=train_autoencoder a new --workdir.")
    assert checksums(ddpm) == before


def test_a_checkpoint_step_is_chosen_by_one_field_and_a_missing_one_named(two_workdirs, tmp_path, checksums):
    ddpm, _, _ = two_workdirs
    tiny_sample = ["--mode=sample", *DDPM_TINY, "--config.sampling.num_samples=4", "--config.sampling.batch_size=4"]
    proc = _run(ddpm, *tiny_sample, "--config.checkpoint_step=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"sampled step 1 of {ddpm}" in proc.stdout
    assert os.path.isfile(os.path.join(ddpm, "samples", "sample_ddpm_step1_seed0_n4.npz"))
    before = checksums(ddpm)
    proc = _run(ddpm, *tiny_sample, "--config.checkpoint_step=5")
    assert proc.returncode == 1 and _error_line(proc) == (
        f"error: checkpoint_step=5: {os.path.join(ddpm, 'checkpoints')} holds steps 1, 2; choose one of them "
        "(-1: the newest).")
    assert checksums(ddpm) == before
    export = subprocess.run([sys.executable, "-m", "ddpm_jax.convert", "--to-diffusers", str(ddpm),
                             "--out", str(tmp_path / "out"), "--checkpoint-step", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert export.returncode == 0 and "of step 1 " in export.stdout, export.stderr[-2000:]


def test_the_closing_lines_say_how_to_view_the_tensorboard_events(two_workdirs):
    import importlib.util

    ddpm, _, stdout = two_workdirs
    view = f"tensorboard --logdir {os.path.join(ddpm, 'tb')}"
    if importlib.util.find_spec("tensorboard") is None:  # the requirements install only the writer
        assert f"(TensorBoard events (tensorboardX); view: pip install tensorboard && {view})" in stdout
    else:
        assert f"(TensorBoard: {view})" in stdout


def test_a_rerun_keeps_the_previous_result_and_a_resume_records_changed_config(two_workdirs, tmp_path):
    import hashlib
    import json
    import shutil

    ddpm = tmp_path / "run"
    shutil.copytree(two_workdirs[0], ddpm)
    bpd = ["--mode=bpd", *DDPM_TINY, "--config.eval.bpd_batch_size=8"]
    assert _run(ddpm, *bpd, "--config.eval.bpd_num_examples=16").returncode == 0
    result = ddpm / "eval" / "bpd_2.json"
    first = hashlib.sha256(result.read_bytes()).hexdigest()
    proc = _run(ddpm, *bpd, "--config.eval.bpd_num_examples=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = sorted(p for p in (ddpm / "eval").glob("bpd_2.*.json"))
    assert len(kept) == 1 and hashlib.sha256(kept[0].read_bytes()).hexdigest() == first
    assert f"{result} existed; kept it as {kept[0]}" in proc.stdout
    assert json.loads(result.read_text())["num_examples"] == 8 and oct(kept[0].stat().st_mode & 0o777) == "0o644"

    proc = _run(ddpm, *DDPM_TINY, "--config.training.checkpoint_every=1", "--config.training.num_steps=3",
                "--config.optim.lr=0.001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    old = json.loads((two_workdirs[0] / "config.json").read_text())
    line = (f"config changed since this workdir's last run: optim.lr {json.dumps(old['optim']['lr'])} -> 0.001, "
            f"training.num_steps 2 -> 3; recorded in {ddpm / 'config_history.jsonl'}")
    assert line in proc.stdout.splitlines()
    (record,) = [json.loads(x) for x in (ddpm / "config_history.jsonl").read_text().splitlines()]
    assert record["changed"] == {"optim.lr": [old["optim"]["lr"], 0.001], "training.num_steps": [2, 3]}
