"""Stage 3 (train.py --stage 3, eval.py qa / chat): the phase plan, where each phase starts, the caption data, the
vision weights taken from a stage-2 encoder, the likelihood scoring of eval.py qa against an independent
computation, and the whole chain lm -> caption -> instruct on 2 ranks with DataLoader workers, resumed, then
evaluated and chatted with, as users run it."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ivmini.chat import IGNORE, collate, encode_conversation
from ivmini.chat_eval import option_scores, qa_eval
from ivmini.config import train_config, vision_config
from ivmini.data.datasets import read_instruct_json
from ivmini.dist import consolidate, latest_checkpoint
from ivmini.stages import stage3
from ivmini.tokenizer import tiny_tokenizer
from ivmini.vit import VideoViT

from test_train import ROOT, env, metrics


def test_phases_plan_folders_steps_and_learning_rates(tmp_path):
    cfg = train_config(3, out=str(tmp_path), max_steps=50)
    plan = stage3.phases(cfg)
    assert [p.task.phase for p in plan] == ["lm", "caption", "instruct"]
    assert [p.out for p in plan] == [str(tmp_path / n) for n in ("lm", "caption", "instruct")]
    assert [p.max_steps for p in plan] == [50, 50, 50]                     # --max-steps caps every phase
    assert [p.base_lr for p in plan] == [cfg.task.lm_lr, cfg.task.caption_lr, cfg.task.instruct_lr]
    assert all(p.warmup_steps <= p.max_steps // 10 for p in plan)
    full = stage3.phases(train_config(3, out=str(tmp_path)))
    assert [p.max_steps for p in full] == [cfg.task.lm_steps, cfg.task.caption_steps, cfg.task.instruct_steps]
    chained = stage3.phases(train_config(3, out=str(tmp_path), init=str(tmp_path / "other")))
    assert [p.task.init for p in chained] == [str(tmp_path / "other"), "auto", "auto"]   # --init starts the chain
    # a released LLM skips phase lm, and cannot run it
    assert [p.task.phase for p in stage3.phases(train_config(3, llm=str(tmp_path)))] == ["caption", "instruct"]
    with pytest.raises(ValueError, match="skips it"):
        stage3.phases(train_config(3, llm=str(tmp_path), phase="lm"))
    with pytest.raises(ValueError, match="phase"):
        train_config(3, phase="pretrain")


def test_a_phase_starts_from_the_previous_phases_folder_or_says_what_is_missing(tmp_path):
    cfg = train_config(3, out=str(tmp_path), phase="instruct")
    [instruct] = stage3.phases(cfg)
    with pytest.raises(FileNotFoundError, match="run --phase caption"):
        stage3.previous_phase(instruct)
    [lm] = stage3.phases(train_config(3, out=str(tmp_path), phase="lm"))
    assert stage3.previous_phase(lm) is None
    with pytest.raises(FileNotFoundError, match="--init"):
        stage3.previous_phase(train_config(3, out=str(tmp_path), phase="caption", init=str(tmp_path / "none")))


def test_caption_prompts_are_drawn_per_sample_and_reproducibly():
    cfg = train_config(3)
    batch = {"qa": [[{"i": None, "q": "", "a": f"caption {k}"}] for k in range(40)], "index": torch.arange(40)}
    a, b = stage3.conversations(batch, cfg, 0), stage3.conversations(batch, cfg, 0)
    assert a == b
    prompts = [r["QA"][0]["i"] for r in a]
    assert set(prompts) <= set(stage3.CAPTION_PROMPTS) and len(set(prompts)) > 1
    assert [r["QA"][0]["a"] for r in a] == [f"caption {k}" for k in range(40)]
    assert prompts != [r["QA"][0]["i"] for r in stage3.conversations(batch, cfg, 1)]   # another epoch, other draws
    qa = [{"i": "watch.", "q": "what?", "a": "that"}]
    assert stage3.conversations({"qa": [qa], "index": torch.tensor([3])}, cfg, 0) == [{"QA": qa}]


@pytest.mark.parametrize("split_qa", [False, True])
def test_phase_lm_writes_the_videos_caption_where_the_video_goes(world, split_qa):
    """Phase lm's samples: every instruction record (or, split, every QA) and every caption of the train split,
    each with its own video's caption as the (unsupervised) text of the video slot; only the answers and their
    eos are supervised."""
    ann = os.path.join(world, "annotations")
    cfg = train_config(3, phase="lm", data=os.path.join(ann, "instruct_train.json"),
                       caption_data=os.path.join(ann, "stage2_train.json"), data_root=world, split_qa=split_qa)
    ds = stage3.dataset(cfg)
    records = json.load(open(os.path.join(ann, "instruct_train.json")))
    captions = {r["video"]: r["caption"] for r in json.load(open(os.path.join(ann, "stage2_train.json")))
                if "video" in r}
    assert len(ds) == (sum(len(r["QA"]) for r in records) if split_qa else len(records)) + len(captions)
    assert max(len(ds[i]["qa"]) for i in range(len(records))) == (1 if split_qa else max(len(r["QA"]) for r in records))
    tok = tiny_tokenizer(world)
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert item["video_text"] == captions[item["path"]]
        enc = encode_conversation({"QA": item["qa"] if item["qa"][0]["i"] else [dict(item["qa"][0], i="say.")]},
                                  tok, 0, video_text=" " + item["video_text"])
        slot = tok.encode(" " + item["video_text"])
        assert any(enc.ids[k:k + len(slot)] == slot for k in range(len(enc.ids)))
        supervised = [t for t, lab in zip(enc.ids, enc.labels) if lab != IGNORE]
        assert supervised == [t for qa in item["qa"] for t in tok.encode(" " + qa["a"]) + [tok.eos_id]]


def test_caption_data_is_required_beside_an_instruction_json(tmp_path):
    cfg = train_config(3, data=str(tmp_path / "it.json"), phase="caption")
    with pytest.raises(ValueError, match="--caption-data"):
        stage3.caption_paths(cfg)


def test_vision_weights_come_from_the_stage2_encoder_without_its_last_block(tmp_path):
    v2 = vision_config("tiny", heads="align", num_frames=4, img_size=56, depth=3, clip_teacher_embed_dim=192,
                       clip_teacher_final_dim=192)
    stage2_vit = VideoViT(v2)
    path = tmp_path / "stage2.pt"
    torch.save({f"vision_encoder.{k}": v for k, v in stage2_vit.state_dict().items()} | {"temp": torch.ones(())}, path)
    vchat = vision_config("tiny", heads="none", num_frames=8, img_size=56, depth=3)
    chat_vit = VideoViT(vision_config("tiny", heads="none", num_frames=8, img_size=56, depth=2))
    sd, where = stage3._vision_state(str(path), vchat, chat_vit)
    assert where == str(path) and set(sd) == set(chat_vit.state_dict())
    for k in sd:
        if k.startswith("blocks.") or k.startswith("patch_embed"):
            assert torch.equal(sd[k], stage2_vit.state_dict()[k]), k
    assert sd["pos_embed"].shape[1] == 1 + 8 * 4 * 4                       # 4 -> 8 frames
    truncated = {k: v for k, v in torch.load(path).items() if "blocks.1." not in k}
    torch.save(truncated, path)
    with pytest.raises(KeyError, match="blocks.1"):
        stage3._vision_state(str(path), vchat, chat_vit)


def tiny_chat(tok, frames=2, size=28):
    mcfg = stage3.ChatModelConfig(
        vision_config("tiny", heads="none", num_frames=frames, img_size=size, depth=2, embed_dim=48, num_heads=2,
                      attn_pool_num_heads=2, clip_embed_dim=48),
        stage3.QFormerConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, num_query_token=3, extra_num_query_token=2, vision_width=48,
                             pad_token_id=tok.pad_id),
        stage3.LLMConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0))
    torch.manual_seed(0)
    return stage3.build_chat(mcfg).eval()


def test_option_scores_are_the_summed_log_probability_of_each_answer(world):
    """eval.py qa's score of an option = -(mean cross-entropy x supervised tokens) of VideoChat.forward on the
    training layout with that option as the answer: computed here one option at a time, without padding."""
    tok = tiny_tokenizer(world)
    model = tiny_chat(tok)
    qa = {"i": "watch the video.", "q": "what colour is the square?", "options": ["red", "a large green one",
                                                                                 "blue", "it moves left"]}
    video = torch.randn(3, 2, 28, 28)
    scores = option_scores(model, video, qa, tok, tok)
    from ivmini.chat import qformer_batch
    qids, qmask = qformer_batch([qa["i"]], tok, 64)
    with torch.no_grad():
        for k, option in enumerate(qa["options"]):
            enc = encode_conversation({"QA": [{"i": qa["i"], "q": qa["q"], "a": option}]}, tok, model.n_visual)
            ids, mask, labels = collate([enc], tok.pad_id)
            loss, _ = model(video[None], ids, mask, labels, qids, qmask)
            n = int((labels[:, 1:] != IGNORE).sum())
            assert scores[k].item() == pytest.approx(-loss.item() * n, rel=1e-5, abs=1e-4)


def test_qa_eval_counts_per_type_and_subset_and_skips_broken_videos(world, tmp_path):
    tok = tiny_tokenizer(world)
    model = tiny_chat(tok, frames=2, size=56)
    records = read_instruct_json(os.path.join(world, "annotations", "instruct_test.json"))[:3]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    records.append(type(records[0])(str(broken), qa=records[0].qa))
    result = qa_eval(model, records, world, tok, tok, subsets={"first": {records[0].path}})
    asked = sum(len(r.qa) for r in records[:3])
    assert result["questions"] == asked and result["skipped"][0]["path"] == str(broken)
    per_q = result["per_question"]
    assert result["metrics"]["all"]["acc"] == pytest.approx(100 * sum(q["correct"] for q in per_q) / asked)
    for q in per_q:
        assert q["correct"] == (q["pred"] == q["answer"] and sorted(q["scores"])[-1] > sorted(q["scores"])[-2])
    assert result["metrics"]["all"]["first"]["questions"] == len(records[0].qa)
    assert result["metrics"]["colour"]["chance"] == pytest.approx(25.0)


def run(*args, nproc=1, check=True, timeout=900, stdin=None):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                             if nproc > 1 else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, input=stdin)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_the_chain_trains_resumes_and_answers(world, tmp_path):
    """torchrun --nproc_per_node=2 train.py --stage 3 (phase all) with DataLoader workers over more than an epoch
    of the small world: each phase writes its folder and starts from the previous one; the trained parts move and
    the frozen ones do not; a second --resume skips the finished phases; eval.py qa and chat run on the result."""
    ann = os.path.join(world, "annotations")
    tok = tiny_tokenizer(world).path
    stage2 = tmp_path / "stage2.pt"          # a stage-2 encoder file (random weights: this test is about plumbing)
    v2 = vision_config("tiny", heads="align", num_frames=4, img_size=56, clip_teacher_embed_dim=192,
                       clip_teacher_final_dim=192)
    torch.save({f"vision_encoder.{k}": v for k, v in VideoViT(v2).state_dict().items()}, stage2)
    out = tmp_path / "s3"
    args = ["train.py", "--stage", "3", "--out", str(out), "--data", os.path.join(ann, "instruct_train.json"),
            f"--caption-data={os.path.join(ann, 'stage2_train.json')}", f"--data-root={world}", "--img-size=56",
            "--num-frames=4", f"--tokenizer={tok}", f"--vision-init={stage2}", "--max-steps=6", "--batch-size=4",
            "--workers=2", "--log-every=1", "--ckpt-every=3", "--num-query-token=4", "--extra-num-query-token=2"]
    proc = run(*args, nproc=2)
    log = proc.stdout + proc.stderr
    for phase in ("lm", "caption", "instruct"):
        assert [m["step"] for m in metrics(out / phase)] == list(range(1, 7)), phase
    assert f"from {out / 'lm' / 'checkpoints' / 'step_00000006'}" in log
    assert f"from {out / 'caption' / 'checkpoints' / 'step_00000006'}" in log
    weights = {p: consolidate(latest_checkpoint(str(out / p / "checkpoints"))) for p in ("lm", "caption", "instruct")}
    lm, cap, ins = weights["lm"], weights["caption"], weights["instruct"]
    assert all(torch.equal(lm[k], cap[k]) for k in lm if k.startswith(("lm.", "vision_encoder.")))   # frozen
    assert not torch.equal(lm["project_up.weight"], cap["project_up.weight"])                          # trained
    assert any(".lora." in k for k in ins) and not any(".lora." in k for k in cap)
    assert all(torch.equal(cap[k], ins[k]) for k in cap if k.startswith(("lm.", "vision_encoder.")))
    assert any(not torch.equal(torch.zeros_like(ins[k]), ins[k]) for k in ins if k.endswith(".lora.q.B"))
    again = run(*args, "--resume", nproc=1)
    assert again.stderr.count("is complete") == 3, again.stderr[-2000:]
    refused = run(*args, nproc=1, check=False)
    assert refused.returncode == 2 and "already holds" in refused.stderr

    results = tmp_path / "qa.json"
    qa = run("eval.py", "qa", "--ckpt", str(out), "--data", os.path.join(ann, "instruct_test.json"),
             f"--data-root={world}", "--out", str(results), "--generate")
    assert "summed log-probability" in qa.stdout and "generated: exact" in qa.stdout
    r = json.loads(results.read_text())
    assert r["questions"] == sum(len(x["QA"]) for x in json.load(open(os.path.join(ann, "instruct_test.json"))))
    assert set(r["metrics"]) >= {"all", "colour", "shape", "motion"}
    per_q = r["per_question"]
    assert r["metrics"]["all"]["gen_acc"] == pytest.approx(100 * sum(q["generated"].lower() == q["options"][q[
        "answer"]].lower() for q in per_q) / len(per_q))
    video = os.path.join(world, json.load(open(os.path.join(ann, "instruct_test.json")))[0]["video"])
    chat = run("eval.py", "chat", "--ckpt", str(out / "instruct"), "--video", video, "--question",
               "what colour is the square?", "--question", "what does it do first?", "--max-new-tokens=4")
    assert chat.stdout.count("Q: ") == 2 and chat.stdout.count("A: ") == 2
    typed = run("eval.py", "chat", "--ckpt", str(out), "--video", video, "--max-new-tokens=4",
                stdin="what colour is the square?\nwhat shape is it?\n\nnot asked\n")
    assert typed.stdout.count("model> ") == 2 and "not asked" not in typed.stdout
    bad = run("eval.py", "chat", "--ckpt", str(out), "--video", str(tmp_path / "missing.mp4"), "--question", "hi",
              check=False)
    assert bad.returncode != 0 and "missing.mp4" in bad.stderr


def test_the_default_command_from_a_clean_checkout(tmp_path):
    """`train.py --stage 3` with nothing else but --max-steps, in a folder without a stage-2 run: the world and its
    tokenizer are made on first use, the video encoder starts random (said in the log), every phase runs."""
    e = dict(env(), IVMINI_DATA=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "3", "--max-steps", "2"],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starts RANDOM" in proc.stderr
    for phase in ("lm", "caption", "instruct"):
        assert latest_checkpoint(str(tmp_path / "runs" / "stage3" / phase / "checkpoints")).endswith("step_00000002")


def test_the_qformer_reads_a_bert_vocabulary_as_cls_text_sep(minilm):
    """--qformer-vocab: the instruction as BERT ids, [CLS] ... [SEP] (the released chat model's Q-Former tokenizer
    call), the last tokens kept when it is too long, left padding."""
    from ivmini.chat import qformer_batch
    from ivmini.text import WordPieceTokenizer
    tok = stage3.BertInstructionTokenizer(os.path.join(minilm, "vocab.txt"))
    wp = WordPieceTokenizer(os.path.join(minilm, "vocab.txt"))
    ids = tok.encode("Watch the video, then answer.", bos=True, eos=True)
    assert ids == wp("Watch the video, then answer.")["input_ids"][0].tolist()
    assert ids[0] == wp.cls_token_id and ids[-1] == wp.sep_token_id
    assert tok.encode("a b") == wp("a b")["input_ids"][0].tolist()[1:-1]
    batch, mask = qformer_batch(["watch the video, then answer.", "hi"], tok, 4)
    assert batch[0].tolist() == ids[-4:] and mask[1].tolist() == [0, 1, 1, 1] and batch[1, 0] == tok.pad_id
