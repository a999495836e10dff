"""eval.py, ivmini/evaluate.py and ivmini/classify.py: the retrieval metrics on known matrices (ties count against the
query, multiple ground-truth captions count the best), ITM re-ranking only inside the top-k, template score
ensembling against a hand computation, the named errors (checkpoint kind, annotation entry, undecodable video), and
one `python eval.py retrieval` end to end on a 2-step stage-2 run whose saved matrices reproduce its JSON.

    python -m pytest tests/test_eval.py -q
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ivmini import classify, evaluate
from ivmini.data.datasets import DataError, Record, read_eval_json
from ivmini.losses import vtm_loss
from ivmini.stages.stage2 import tokenizer

from test_train import ROOT, env
from test_train_stage2 import stage2


def test_best_ranks_count_ties_against_the_query_and_take_the_best_truth():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1],
                           [0.2, 0.7, 0.7, 0.3],
                           [0.4, 0.3, 0.2, 0.1]])
    # query 0: truth 0 is first; query 1: truth 2 ties with 1 -> rank 1; query 2: truths 3 (last) and 1 -> 1
    assert evaluate.best_ranks(scores, [[0], [2], [3, 1]]).tolist() == [0, 1, 1]
    m = evaluate.recall_metrics(torch.tensor([0, 1, 5, 12]), torch.tensor([0, 0, 9]))
    assert m["t2v_r1"] == 25.0 and m["t2v_r5"] == 50.0 and m["t2v_r10"] == 75.0
    assert m["v2t_r1"] == pytest.approx(200 / 3) and m["v2t_r5"] == pytest.approx(200 / 3) and m["v2t_r10"] == 100
    assert m["t2v_r_mean"] == 50.0 and m["r_mean"] == pytest.approx((50.0 + (400 / 3 + 100) / 3) / 2)


def test_retrieval_metrics_with_two_captions_per_video():
    """3 videos, video 1 has captions 1 and 2. v2t of video 1: caption 2 is ranked first -> rank 0 although
    caption 1 is last; t2v of caption 1: its video is behind video 0 -> rank 1."""
    itc = torch.tensor([[0.9, 0.1, 0.0],     # caption 0 (video 0)
                        [0.8, 0.3, 0.1],     # caption 1 (video 1)
                        [0.0, 0.9, 0.2],     # caption 2 (video 1)
                        [0.1, 0.0, 0.6]])    # caption 3 (video 2)
    metrics, ranks = evaluate.retrieval_metrics(evaluate.score_sets(itc), [0, 1, 1, 2],
                                                {"last": [False, False, True]})
    assert ranks["sim"]["t2v"] == [0, 1, 0, 0]
    assert ranks["sim"]["v2t"] == [0, 0, 0]          # video 0: caption 0 (0.9) beats caption 1 (0.8)
    assert metrics["sim"]["all"]["t2v_r1"] == 75.0 and metrics["sim"]["last"]["t2v_r1"] == 100.0
    t2v, v2t = evaluate.score_sets(itc)["dsl"]
    assert torch.allclose(t2v, itc.double() * torch.softmax(itc.double(), dim=0))
    assert torch.allclose(v2t, itc.double().T * torch.softmax(itc.double().T, dim=0))


def test_same_text_ground_truths_and_ties_among_them():
    """Captions that repeat ("silence") make every video holding that text a ground truth: a query ranks by its best
    ground truth, ties among ground truths do not count against it, ties with another video do."""
    texts = ["silence", "two beeps", "silence", "a tone"]        # caption c belongs to video c
    videos_of, captions_of = evaluate.ground_truths([0, 1, 2, 3], texts)
    assert videos_of == [[0, 2], [1], [0, 2], [3]] and captions_of == [[0, 2], [1], [0, 2], [3]]
    itc = torch.tensor([[0.5, 0.3, 0.5, 0.2],     # silence: videos 0 and 2 tie at the top -> rank 0
                        [0.3, 0.3, 0.0, 0.1],     # two beeps: ties with video 0 -> rank 1
                        [0.1, 0.0, 0.4, 0.9],     # silence: video 2 behind video 3 only -> rank 1
                        [0.0, 0.0, 0.0, 0.7]])
    metrics, ranks = evaluate.retrieval_metrics(evaluate.score_sets(itc), [0, 1, 2, 3], texts=texts)
    assert ranks["sim"]["t2v"] == [0, 1, 1, 0]
    # video 1: caption 0 (0.3) ties with its own (0.3) -> 1; video 3: caption 2 (0.9) beats its own (0.7) -> 1
    assert ranks["sim"]["v2t"] == [0, 1, 0, 1]
    _, own = evaluate.retrieval_metrics(evaluate.score_sets(itc), [0, 1, 2, 3])
    assert own["sim"]["t2v"] == [1, 1, 1, 0]      # without: video 2 ties with caption 0's own video


def test_audio_modalities_need_the_audio_visual_model(tiny_run):
    model, _ = evaluate.load_run(str(tiny_run))
    evaluate.check_modality(model, "video", itm=True)
    for modality in ("audio", "audio-video"):
        with pytest.raises(evaluate.CheckpointKindError, match="needs an audio-visual stage-2 model"):
            evaluate.check_modality(model, modality, itm=False)


def test_itm_reranks_only_inside_each_querys_top_k(seed):
    Nt, Nv, k = 7, 5, 2
    itc = torch.randn(Nt, Nv, dtype=torch.float64)
    calls = []

    def fake(t, v):                                  # a known score per pair, and a record of what was asked
        calls.extend(zip(t.tolist(), v.tolist()))
        return (10.0 * t + v).float()
    t2v, v2t = evaluate.rerank(itc, k, fake, batch_size=3)
    top_v = {(t, int(v)) for t in range(Nt) for v in itc[t].topk(k).indices}
    top_t = {(int(t), v) for v in range(Nv) for t in itc[:, v].topk(k).indices}
    assert set(calls) == top_v | top_t and len(calls) == len(top_v | top_t)   # each pair scored once
    for t in range(Nt):
        for v in range(Nv):
            assert t2v[t, v] == (10.0 * t + v if (t, v) in top_v else -100.0)
            assert v2t[v, t] == (10.0 * t + v if (t, v) in top_t else -100.0)


def test_template_ensembling_against_a_hand_computation():
    texts = classify.class_prompts(["Moving Left", "rotating"])
    assert len(classify.TEMPLATES) == 16 and len(texts) == 32
    assert texts[0] == "a photo of action moving left" and texts[16] == "a photo of action rotating"
    assert texts[11] == "can you recognize the action of moving left"        # pre_text: lower case, no '?'
    scores = torch.rand(3, 2 * 16, dtype=torch.float64)
    out = classify.ensemble_templates(scores)
    for v in range(3):
        for c in range(2):
            assert out[v, c] == pytest.approx(sum(scores[v, c * 16 + t].item() for t in range(16)) / 16)
    correct = classify.topk_correct(torch.tensor([[0.2, 0.2, 0.1], [0.5, 0.1, 0.4]]), [0, 0], 1)
    assert correct.tolist() == [False, True]          # a tie for first is not a correct top-1


def test_wrong_checkpoint_kind_names_the_accepted_kinds(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000002"        # a stage-1 run: no text tower in its config
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")
    (step / "meta.json").write_text(json.dumps({"model_config": {"embed_dim": 64}, "step": 2}))
    with pytest.raises(evaluate.CheckpointKindError, match="'stage1' checkpoint.*accepts kind 'stage2'"):
        evaluate.load_model(str(tmp_path / "run"), "retrieval")
    export = tmp_path / "s1.pt"
    export.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="--spec"):
        evaluate.load_model(str(export), "classify")
    (tmp_path / "s1.json").write_text(json.dumps({"kind": "stage1_pretrain", "kwargs": {}}))
    with pytest.raises(evaluate.CheckpointKindError, match="'stage1_pretrain'.*`eval.py classify` accepts"):
        evaluate.load_model(str(export), "classify")


def test_bad_multiple_choice_entry_is_named(tmp_path):
    good = {"video": "a.mp4", "caption": ["a dog", "a cat"], "answer": 1}
    path = tmp_path / "mc.json"
    path.write_text(json.dumps([good, {"video": "b.mp4", "caption": ["x", "y"], "answer": 2}]))
    with pytest.raises(ValueError, match="entry 1: answer must be an index into the 2 options"):
        classify.read_multiple_choice(str(path))
    path.write_text(json.dumps([good, {"video": "c.mp4", "QA": [{"q": "what?", "options": ["a", "b"]}]}]))
    with pytest.raises(ValueError, match="entry 1: QA 0: needs 'q', 'options' and 'answer_idx'"):
        classify.read_multiple_choice(str(path))
    path.write_text(json.dumps([good, {"video": "d.mp4", "QA": [{"q": "What colour?", "options": ["red", "blue"],
                                                                 "answer_idx": 0, "type": "colour"}]}]))
    qs = classify.read_multiple_choice(str(path))
    assert qs[1] == {"video": "d.mp4", "type": "colour", "options": ["what colour red", "what colour blue"],
                     "answer": 0}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, world, minilm):
    out = tmp_path_factory.mktemp("eval") / "s2"
    stage2(out, world, "--max-steps=2", "--batch-size=4")
    return out


def test_eval_retrieval_end_to_end(tiny_run, world, minilm, tmp_path):
    """The command prints the protocol line first, writes the JSON and the matrices, whose recomputed metrics
    equal the JSON's; it refuses to overwrite; ITM scores equal the training VTM head's on the same pairs;
    a missing video makes retrieval refuse, naming it. --out may be in a folder that does not exist yet."""
    data = os.path.join(world, "annotations", "retrieval_test.json")
    out = tmp_path / "new" / "r.json"
    cmd = [sys.executable, "eval.py", "retrieval", "--ckpt", str(tiny_run), "--data", data, f"--data-root={world}",
           "--out", str(out), "--k", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith("retrieval | stage2 ") and "top-3" in proc.stdout.splitlines()[0]
    res = json.loads(out.read_text())
    mats = {n: np.load(out.parent / f) for n, f in res["matrices"].items()}
    assert mats["itc"].shape == (res["captions"], res["videos"])
    assert ((mats["itm_t2v"] != -100).sum(1) == 3).all()             # each caption: its 3 best videos re-ranked
    sets = evaluate.score_sets(mats["itc"], mats["itm_t2v"], mats["itm_v2t"].T)
    metrics, ranks = evaluate.retrieval_metrics(sets, res["caption_video"])
    assert ranks == res["ranks"]
    assert all(metrics[s]["all"] == res["metrics"][s]["all"] for s in ("sim", "dsl", "match"))
    assert res["headline"]["value"] == res["metrics"]["match"]["all"]["t2v_r1"]

    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr

    model, meta = evaluate.load_run(str(tiny_run))
    records = read_eval_json(data)[:3]
    vis_tok, vis, _, _ = evaluate.encode_videos(model, records, world, num_frames=4, size=56)
    txt_tok, atts, txt = evaluate.encode_texts(model, [r.caption_list[0] for r in records], tokenizer(minilm), 16)
    ours = evaluate.itm_scorer(model, txt_tok, atts, vis_tok)(torch.arange(3), torch.arange(3))
    arange = torch.arange(3)
    with torch.no_grad():
        _, logits = vtm_loss(model.text_encoder.bert, model.itm_head, model.temp, vis_tok, txt_tok, vis, txt, atts,
                             None, negatives=(arange, arange))
    torch.testing.assert_close(ours, logits[:3, 1])

    with pytest.raises(DataError, match="1 of the 4 videos could not be decoded.*videos/missing.mp4"):
        evaluate.retrieval_eval(model, records + [Record("videos/missing.mp4", caption_list=["a dog"])], world,
                                tokenizer(minilm), size=56, max_txt_l=16)
