from __future__ import annotations

from mlflow import MlflowClient

from enn_neuro.tracking import StudyTracker
from enn_neuro.tracking.mlflow_tracker import RUN_KEY_TAG


def test_a_run_key_reopens_the_run_it_started(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "tests")
    parent = tracker.start_run("study", key="uid/study")
    child = tracker.start_run("study-fold0", parent_id=parent, key="uid/fold-0")
    tracker.end_run(child, "KILLED")

    # a resume that never saw the ids (killed before saving them) finds the same runs
    assert tracker.start_run("study", key="uid/study") == parent
    assert tracker.start_run("study-fold0", parent_id=parent, key="uid/fold-0") == child
    other = tracker.start_run("study-fold1", parent_id=parent, key="uid/fold-1")
    assert other not in (parent, child)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([tracker.experiment_id])
    assert sorted(r.data.tags[RUN_KEY_TAG] for r in runs) == [
        "uid/fold-0",
        "uid/fold-1",
        "uid/study",
    ]
    assert client.get_run(child).info.status == "RUNNING"  # reopened
