"""Stopping on a signal: Ctrl-C saves like SIGTERM, and a SIGTERM to one process of a 2-process
run (jax.distributed, gloo on 127.0.0.1) stops both at the same step through JAX's preemption
sync point, with one checkpoint that the next run (one process, 2 -> 1) resumes from.

The runs are long (100000 steps) so the signal always lands mid-run; each is stopped by the
signal or by ``train.max_steps_per_run``, so none evaluates.
"""
import json
import os
import re
import signal
import subprocess
import time

from contrastive_jax.train.loop import EXIT_PREEMPTED, StopRequest, train
from tests.train.test_resilience import _cli, _env, _free_port, _wait_for_checkpoint
from tests.train.test_train import REPO, _tiny

LONG = ["--config.train.total_steps=100000", "--config.checkpoint.every_steps=2", "--config.train.log_every_steps=1"]


def _steps(ckpt_dir):
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _stopped_at(stderr):
    found = re.findall(r"Stopped at step (\d+) \((\w+)\); checkpoint saved", stderr)
    assert len(found) <= 1, stderr[-2000:]
    return (int(found[0][0]), found[0][1]) if found else None


def test_first_ctrl_c_saves_and_second_restores_the_default_action():
    """The handler alone, in this process: the first SIGINT asks for a stop and makes the next
    one end the process at once (the OS default); close() puts the previous handler back."""
    previous = signal.getsignal(signal.SIGINT)
    stop = StopRequest(deadline_minutes=-1, t_start=time.time())
    try:
        assert stop.poll(1) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.poll(2) == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is previous


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_130(monkeypatch, capsys):
    """Before the loop installs its handler (imports, config) or after it ends (final evaluation),
    Ctrl-C raises KeyboardInterrupt: the command reports it in one line, without a traceback."""
    from contrastive_jax.commands import train as command

    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "_run", interrupted)
    assert command.run(None, []) == command.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["contrastive-jax: interrupted (Ctrl-C); every checkpoint written so far is intact"]


def test_ctrl_c_saves_a_checkpoint_and_exits_like_sigterm(tmp_path):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    proc = subprocess.Popen(_cli(workdir, data_dir, *LONG), env=_env(2), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(proc, workdir / "checkpoints", 4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in err
    step, reason = _stopped_at(err)
    assert reason == "SIGINT" and step == max(_steps(workdir / "checkpoints"))
    assert json.loads(out[out.index("{"):])["preempted"] == "SIGINT"
    assert not (workdir / "trainer.lock").exists()
    # (Resuming from a signal's checkpoint: below, and test_resilience.py's in-process SIGTERM test.)


def _two_processes(workdir, data_dir, *extra):
    port = _free_port()
    return [subprocess.Popen(_cli(workdir, data_dir, *LONG, *extra, "--coordinator", f"127.0.0.1:{port}",
                                  "--num-processes", "2", "--process-id", str(i)),
                             env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes(tmp_path):
    workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
    procs = _two_processes(workdir, data_dir)
    try:
        _wait_for_checkpoint(procs[1], workdir / "checkpoints", 2)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only: JAX's preemption service tells process 0
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == EXIT_PREEMPTED, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    # Only process 0 prints; it names the step every process saved.
    step, reason = _stopped_at(outs[0][1])
    assert reason == "SIGTERM" and _stopped_at(outs[1][1]) is None
    assert json.loads(outs[0][0][outs[0][0].index("{"):])["stopped_at_step"] == step
    assert step == max(_steps(workdir / "checkpoints"))
    assert not (workdir / "trainer.lock").exists()

    # Resumed by ONE process with all 8 devices (2 processes -> 1), in this process.
    resumed = train(_tiny(str(workdir), *(o[len("--config."):] for o in LONG), "train.max_steps_per_run=2",
                          "eval.every_steps=0"), str(workdir))
    assert resumed["resumed_from_step"] == step and resumed["stopped_at_step"] == step + 2
    assert max(_steps(workdir / "checkpoints")) == step + 2
