"""Published numbers and benchmark data instructions for `muse reproduce` (data, not code).

`PUBLISHED[dataset]`: [(system, {metric: value})] of spec section 10 (ViT-B/32, text -> video,
percentages except MdR / MnR ranks). `COUNTERPART[our head]`: the published system it is compared with.
`PUBLISHED_PROTOCOL[system]`: how that number was selected. `METRICS`: the page's column order.
`WHERE_TO_GET[dataset]`: where a benchmark's files come from and the layout `load_dataset` expects
(the message when they are absent).
"""

from __future__ import annotations

# Spec section 10 (ViT-B/32, text -> video).
PUBLISHED: dict[str, list[tuple[str, dict[str, float]]]] = {
    "msrvtt": [
        ("CLIP zero-shot", {"R1": 31.1, "R5": 53.7, "R10": 63.4, "MdR": 4, "MnR": 41.6}),
        ("CLIP4Clip meanP", {"R1": 43.1, "R5": 70.4, "R10": 80.8, "MdR": 2, "MnR": 16.2}),
        ("CLIP4Clip seqTransf", {"R1": 44.5, "R5": 71.4, "R10": 81.6, "MdR": 2, "MnR": 15.3}),
        ("MUSE released log (best epoch)", {"R1": 44.8, "R5": 71.6, "R10": 82.1, "MdR": 2, "MnR": 15.6}),
    ],
    "didemo": [("CLIP4Clip meanP", {"R1": 43.4})],
    "activitynet": [("CLIP4Clip meanP", {"R1": 40.5})],
}
# Which published system each of our rows is the counterpart of.
COUNTERPART = {
    "zero-shot": "CLIP zero-shot",
    "meanP": "CLIP4Clip meanP",
    "seqTransf": "CLIP4Clip seqTransf",
    "muse": "MUSE released log (best epoch)",
}
# How the published numbers were selected (CLIP4Clip's main_task_retrieval.py and MUSE's released code
# evaluate the test split after every epoch and keep the best: spec section 11).
PUBLISHED_PROTOCOL = {
    "CLIP zero-shot": "no training",
    "CLIP4Clip meanP": "best epoch chosen on the test split (upstream code)",
    "CLIP4Clip seqTransf": "best epoch chosen on the test split (upstream code)",
    "MUSE released log (best epoch)": "best epoch chosen on the test split (released log)",
}
METRICS = ("R1", "R5", "R10", "MdR", "MnR")

WHERE_TO_GET = {
    "msrvtt": """MSR-VTT is not here. Get the videos and the CLIP4Clip split files
(MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv; see the CLIP4Clip repository's data
instructions) and lay them out as:
  $MSRVTT_ROOT/MSRVTT_data.json
  $MSRVTT_ROOT/MSRVTT_train.9k.csv
  $MSRVTT_ROOT/MSRVTT_JSFUSION_test.csv
  $MSRVTT_ROOT/videos/all/video0.mp4 ... video9999.mp4   (or videos/ or the root itself)
then run: make reproduce-msrvtt MSRVTT_ROOT=/path/to/msrvtt""",
    "didemo": """DiDeMo is not here. Get the videos and the annotation files (LocalizingMoments
repository: train_data.json, val_data.json, test_data.json) plus the split lists
{train,val,test}_list.txt (CLIP4Clip data instructions), laid out as:
  $DIDEMO_ROOT/{train,val,test}_data.json
  $DIDEMO_ROOT/{train,val,test}_list.txt
  $DIDEMO_ROOT/videos/<video id>[.<ext>]
then run: make reproduce-didemo DIDEMO_ROOT=/path/to/didemo""",
    "activitynet": """ActivityNet Captions is not here. Get the ActivityNet videos and the captions
(train.json, val_1.json from the ActivityNet Captions release), laid out as:
  $ACTIVITYNET_ROOT/train.json
  $ACTIVITYNET_ROOT/val_1.json
  $ACTIVITYNET_ROOT/videos/v_XXXXXXXXXXX.mp4   (or XXXXXXXXXXX.<ext>)
then run: make reproduce-activitynet ACTIVITYNET_ROOT=/path/to/activitynet""",
}
