"""eval.py retrieval / classify on an InternVideo2-CLIP file (ivmini/clip.py; facts §4): a tiny VideoCLIP written
in the released layout with its spec and a tiny sentencepiece model beside it, three real mp4 files.

Checked against independent computations: the saved ITC matrix equals VideoCLIP's own encode_vision /
encode_text cosine, each text tokenised here by hand as "summarize:" + caption with <s> and </s> and run alone
(no padding); classify's scores equal the mean over the 16 templates of those raw cosines (the official CLIP
score ensembling). Also: the protocol line (ITC only, 8 frames, the CLIP text format), right padding and
truncation of CLIPTextTokenizer, and the named errors (no tokenizer, a task that needs ITM).

    python -m pytest tests/test_eval_clip.py -q
"""
import importlib.util
import json
import os

import av
import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from ivmini import classify, evaluate
from ivmini.checkpoint import clip_to_official, official_config
from ivmini.checkpoint.llm import llm_config_from_hf
from ivmini.clip import CLIPConfig, VideoCLIP
from ivmini.data.datasets import VideoDataset, pre_text, read_eval_json
from ivmini.data.transforms import make_rng
from ivmini.tokenizer import train_sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION_KW = dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, attn_pool_num_heads=2,
                 clip_embed_dim=24, num_frames=8, init_values=0.1, drop_path_rate=0.0)
V = 384                      # 256 byte pieces + specials + what BPE learns on the sentences below, then reserved
TEXT_HF = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
KW = dict(vision=VISION_KW, text=TEXT_HF, lora_r=4, lora_alpha=8.0)
CAPTIONS = [["a red square moves left"], ["a blue circle turns", "two small dots jump up and down"],
            ["a green triangle grows"]]
CLASSES = ["moving left", "rotating", "growing"]


def eval_main():
    """eval.py's main, loaded from the repository root (in-process: no second interpreter start)."""
    spec = importlib.util.spec_from_file_location("ivmini_eval_cli", os.path.join(ROOT, "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def write_video(path, seed, n=12, size=32):
    """n frames of random colour blocks (each video and frame its own), H.264."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"threads": "1"}
        for _ in range(n):
            blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            img = np.ascontiguousarray(blocks.repeat(size // 4, 0).repeat(size // 4, 1))
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """-> (folder, the VideoCLIP written there): clip.pt + clip.json + tokenizer.model, v0-2.mp4, ret.json,
    cls.csv + classes.json."""
    d = tmp_path_factory.mktemp("clip_eval")
    lines = [c for caps in CAPTIONS for c in caps] + [pre_text(t.format(c)) for c in CLASSES
                                                      for t in classify.TEMPLATES]
    (d / "tokenizer.model").write_bytes(train_sp(["summarize:" + x for x in lines] + lines, V))
    torch.manual_seed(0)
    cfg = CLIPConfig(vision=official_config("clip_vision", **VISION_KW), text=llm_config_from_hf(TEXT_HF),
                     lora_r=4, lora_alpha=8.0)
    model = VideoCLIP(cfg)
    with torch.no_grad():            # fresh LoRA B is 0 and text_projection small: make every part show
        for name, p in model.named_parameters():
            if name.endswith(".B") or name == "text_projection":
                p.normal_(0, 0.3)
    torch.save(clip_to_official(model.state_dict(), cfg), d / "clip.pt")
    (d / "clip.json").write_text(json.dumps({"kind": "clip", "kwargs": KW}))
    for i in range(3):
        write_video(d / f"v{i}.mp4", seed=i)
    (d / "ret.json").write_text(json.dumps([{"video": f"v{i}.mp4", "caption": caps if len(caps) > 1 else caps[0]}
                                            for i, caps in enumerate(CAPTIONS)]))
    (d / "cls.csv").write_text("".join(f"v{i}.mp4,{i}\n" for i in range(3)))
    (d / "classes.json").write_text(json.dumps(CLASSES))
    return d, model.eval()


def by_hand(model, folder, texts):
    """(Nt, Nv) cosines: each text as [<s>] + sentencepiece("summarize:" + text) + [</s>], alone; the 3 videos at
    8 frames (the test transform, middle sampling)."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    records = read_eval_json(str(folder / "ret.json"))
    data = VideoDataset(records, str(folder), num_frames=8, size=28, transform="test", sample="middle", flip=False)
    video = torch.stack([data.load(i, make_rng(0, 0, i))["video"] for i in range(3)])
    assert video.shape == (3, 3, 8, 28, 28)
    with torch.no_grad():
        vis = F.normalize(model.encode_vision(video)[1].double(), dim=-1)
        txt = []
        for t in texts:
            ids = torch.tensor([[sp.bos_id()] + sp.encode("summarize:" + t) + [sp.eos_id()]])
            txt.append(model.encode_text(ids, torch.ones_like(ids))[1][0])
        txt = F.normalize(torch.stack(txt).double(), dim=-1)
    return txt @ vis.T


def test_clip_tokenizer_is_the_official_text_format(setup):
    folder, model = setup
    tok = evaluate.CLIPTextTokenizer(str(folder / "tokenizer.model"), model.cfg.text)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    texts = ["a red square", "two small dots jump up and down"]
    enc = tok(texts, padding=True, max_length=80)
    rows = [[1] + sp.encode("summarize:" + t) + [2] for t in texts]
    L = max(map(len, rows))
    assert enc["input_ids"].shape == (2, L)
    for b, r in enumerate(rows):                                   # right padding with pad id 0, mask over the row
        assert enc["input_ids"][b].tolist() == r + [0] * (L - len(r))
        assert enc["attention_mask"][b].tolist() == [1] * len(r) + [0] * (L - len(r))
    m = len(rows[0])                                               # row 0 fits exactly, row 1 is longer
    assert len(rows[1]) > m
    with pytest.warns(UserWarning, match=f"1 of 2 texts are longer than {m} tokens"):
        cut = tok(texts, max_length=m)
    assert cut["input_ids"].tolist() == [rows[0], rows[1][:m - 1] + [2]]   # cut at the right, </s> kept
    bad = dict(TEXT_HF, vocab_size=V + 1)
    with pytest.raises(ValueError, match=f"has {V} pieces but the LLM has vocab_size={V + 1}"):
        evaluate.CLIPTextTokenizer(str(folder / "tokenizer.model"), llm_config_from_hf(bad))


def test_retrieval_on_clip_is_itc_only_and_equals_the_models_cosines(setup, capsys):
    folder, model = setup
    out = folder / "r.json"
    eval_main()(["retrieval", "--ckpt", str(folder / "clip.pt"), "--data", str(folder / "ret.json"),
                 "--out", str(out), "--batch-size", "2"])
    protocol = capsys.readouterr().out.splitlines()[0]
    assert protocol.startswith("retrieval | clip ") and "| 8 frames, middle sampling" in protocol
    assert "text 'summarize:' + caption + </s>" in protocol and "right padding), max 80 tokens" in protocol
    assert "ITC only: a CLIP model has no ITM head, --no-itm implied" in protocol
    res = json.loads(out.read_text())
    assert res["itm"] is False and list(res["matrices"]) == ["itc"] and res["headline"]["set"] == "sim"
    assert set(res["metrics"]) == {"sim", "dsl"} and res["captions"] == 4
    itc = np.load(folder / res["matrices"]["itc"])
    want = by_hand(model, folder, [c for caps in CAPTIONS for c in caps])
    assert itc.shape == (4, 3) and want.std() > 0.01            # the texts and videos are told apart
    np.testing.assert_allclose(itc, want.numpy(), rtol=0, atol=2e-5)
    metrics, _ = evaluate.retrieval_metrics(evaluate.score_sets(itc), res["caption_video"])
    assert metrics["sim"]["all"] == res["metrics"]["sim"]["all"]


def test_classify_on_clip_ensembles_raw_cosines_over_the_templates(setup, capsys):
    folder, model = setup
    out = folder / "c.json"
    eval_main()(["classify", "--ckpt", str(folder / "clip.pt"), "--data", str(folder / "cls.csv"),
                 "--out", str(out)])
    protocol = capsys.readouterr().out.splitlines()[0]
    assert protocol.startswith("classify | clip ") and "| 8 frames" in protocol
    assert "ITC cosine (raw, as the official CLIP evaluation) over the 16 x classes texts" in protocol
    res = json.loads(out.read_text())
    scores = np.load(folder / res["matrices"]["scores"])
    texts = [pre_text(t.format(c)) for c in CLASSES for t in classify.TEMPLATES]
    cos = by_hand(model, folder, texts)                          # (48, 3)
    want = np.array([[np.mean([cos[c * 16 + t, v].item() for t in range(16)]) for c in range(3)] for v in range(3)])
    np.testing.assert_allclose(scores, want, rtol=0, atol=2e-5)
    assert [p["pred"] for p in res["predictions"]] == want.argmax(1).tolist()


def test_clip_errors_are_named(setup):
    folder, _ = setup
    main = eval_main()
    ckpt = ["--ckpt", str(folder / "clip.pt"), "--data", str(folder / "ret.json")]
    with pytest.raises(SystemExit, match="needs its LLaMA sentencepiece tokenizer: pass --tokenizer"):
        main(["retrieval", *ckpt, "--tokenizer", str(folder / "nothing.model"), "--out", str(folder / "e1.json")])
    with pytest.raises(SystemExit, match="--text-model is the stage-2 WordPiece vocabulary"):
        main(["retrieval", *ckpt, "--text-model", str(folder), "--out", str(folder / "e2.json")])
    with pytest.raises(SystemExit, match="'clip' checkpoint; `eval.py mcqa` accepts kind 'stage2'"):
        main(["mcqa", *ckpt, "--out", str(folder / "e3.json")])
