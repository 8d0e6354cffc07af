"""A search killed mid-trial resumes without redoing finished trials, its trials run in
processes of their own (the search process stays flat), and no trial process outlives its
search."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tuning_support import LEARNING_RATE, cli, trial_records, write_space

from keras_llm import tuning


@pytest.mark.slow
def test_interrupted_search_resumes_without_redoing_trials_and_stays_flat(tmp_path, corpus):
    """A search killed mid-trial is rerun: the finished trials are kept, the rest run in the
    rerun's own trial processes, and the rerun's search process does not grow with them."""
    path = write_space(tmp_path, corpus, {"train.learning_rate": LEARNING_RATE})
    out = str(tmp_path / "search")
    command = cli("--config", path, "--max-trials", "4", "--steps-per-trial", "2",
                  "--output-dir", out)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if os.path.isdir(os.path.join(out, tuning.SEARCH_DIR)) and sum(
                    r["status"] == "COMPLETED" for r in trial_records(out).values()) >= 1:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the search ended before it could be interrupted"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    done_before = {i: r for i, r in trial_records(out).items() if r["status"] == "COMPLETED"}
    assert 1 <= len(done_before) <= 2
    assert not os.path.exists(os.path.join(out, "metadata.json"))

    subprocess.run(command, check=True, timeout=420, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = trial_records(out)
    assert sorted(records) == ["0", "1", "2", "3"]
    assert all(r["status"] == "COMPLETED" for r in records.values())
    for trial_id, record in done_before.items():  # not redone
        assert records[trial_id]["pid"] == first.pid
    rerun = [records[i] for i in sorted(records) if records[i]["pid"] != first.pid]
    assert len(rerun) == 4 - len(done_before)
    with open(os.path.join(out, tuning.RESULTS_JSON)) as f:
        assert len(json.load(f)["trials"]) == 4

    # Each trial runs in its own process. From its first trial to its last (two or three
    # trials), the rerun's search process must not grow (in-process trials left about
    # 13 MiB of TensorFlow graphs each), and every trial peaks alike.
    peak, rss, trial_peak = ([r[key] for r in rerun] for key in (
        "peak_rss_mb", "rss_mb", "trial_peak_rss_mb"))
    print("search process peak RSS after each trial (MiB):", peak, "RSS:", rss,
          "each trial's own peak:", trial_peak)
    assert peak[-1] - peak[0] < 10
    assert rss[-1] - rss[0] < 10
    assert max(trial_peak) - min(trial_peak) < 60


CHILD_OF_A_SEARCH = """
import multiprocessing, os, sys, time
from keras_llm.processes import exit_with_parent

def trial(parent_pid, pid_file):
    exit_with_parent(parent_pid)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(300)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(
        target=trial, args=(os.getpid(), sys.argv[1]))
    process.start()
    process.join()
"""


def running(pid):
    """Whether `pid` runs (a dead, unreaped process is a zombie: state Z)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_trial_process_dies_with_its_search(tmp_path):
    """A killed search leaves no trial process behind: it would go on writing into the trial
    directory that the resumed search hands to a new trial process."""
    script, pid_file = tmp_path / "search.py", str(tmp_path / "trial.pid")
    script.write_text(CHILD_OF_A_SEARCH)
    search = subprocess.Popen([sys.executable, str(script), pid_file])
    try:
        deadline = time.time() + 120
        while not os.path.exists(pid_file):
            assert search.poll() is None and time.time() < deadline, "the trial never started"
            time.sleep(0.1)
        with open(pid_file) as f:
            trial_pid = int(f.read())
        assert running(trial_pid)
        search.send_signal(signal.SIGKILL)
        search.wait()
        deadline = time.time() + 10
        while running(trial_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(trial_pid), "the trial process outlived its search"
    finally:
        search.kill()
        search.wait()
        if os.path.exists(pid_file):
            with open(pid_file) as f:
                pid = int(f.read())
            if running(pid):
                os.kill(pid, signal.SIGKILL)
