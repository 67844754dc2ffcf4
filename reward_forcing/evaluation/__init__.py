"""Evaluation kit: score folders of videos, compare runs, run the paper's protocols (docs/evaluation.md).

* ``metrics``: weight-free metrics from decoded frames (numpy + OpenCV);
* ``videos``: finding videos, attaching prompts, decoding once;
* ``scorers``: optional model-based scores (VideoReward VQ/MQ/TA, VBench through the ``vbench`` package);
* ``runner``: one pass over a folder, records as JSON lines / CSV and a summary;
* ``report``: side-by-side tables, plots and a self-contained HTML report;
* ``protocol``: the ``configs/eval/*.yaml`` protocols (generation with inference.py, then scoring).

Nothing here imports ``reward_forcing.training``. Needs the ``eval`` extra (``pip install -e ".[eval]"``).
"""
from ..extras import require

require("eval", "the evaluation kit (reward_forcing.evaluation)")

from .metrics import MetricConfig, VideoScores, score_frames  # noqa: E402
from .runner import RunResult, ScoringOptions, evaluate_videos  # noqa: E402
from .videos import VideoEntry, VideoReadError, describe_videos, list_videos, read_video  # noqa: E402

__all__ = ["MetricConfig", "VideoScores", "score_frames", "ScoringOptions", "RunResult", "evaluate_videos",
           "VideoEntry", "VideoReadError", "describe_videos", "list_videos", "read_video"]
