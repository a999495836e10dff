"""A Llama/Mistral-class causal language model: the LLM of the stage-3 chat model (InternVideo2-Chat-8B uses
Mistral-7B-Instruct-v0.3, facts §5.1) and the text tower of the CLIP variant (facts §4). Upstream: HF
LlamaForCausalLM / MistralForCausalLM (facts only: the formulas, the config field names, the key names).

    LLMConfig, LLM_PRESETS   HF LlamaConfig/MistralConfig field names; "tiny" (the CPU default, trained on the
                             synthetic world) and "mistral-7b" (the real size, v0.3's config.json)
    KVCache                  per-layer keys/values (after RoPE) and the attention mask of everything cached
    LLM                      embed_tokens -> layers.N (ivmini.layers.Block) -> norm -> lm_head; generate()
    generation_speed         tokens/s of generate() with and without the cache (python -m ivmini.llm)

Each layer is one shared Block: pre-norm RMSNorm (kernels.rms_norm), self-attention with a fused `qkv` of
rows [q_proj; k_proj; v_proj] (GQA: num_key_value_heads), RoPE in the rotate-half convention with theta =
rope_theta, causal through kernels.attention, `proj` = o_proj, SwiGLU Mlp with fc1 = [gate_proj; up_proj],
fc2 = down_proj, no biases. `lm_head` is tied to `embed_tokens` (one Parameter) when tie_word_embeddings.
The HF key map lives in ivmini/checkpoint/llm.py.

Padding and positions. Batches are LEFT-padded (attention_mask (B, L), 1 = token, 0 = pad), as the chat
prompts are. A token's RoPE position is the number of real tokens before it: positions start at 0 at each
sample's first real token, as HF computes position_ids = cumsum(attention_mask) - 1 (pads get 0 here, 1 in
HF; a pad's position is never seen: its key is masked and its output is not used). Pad keys are masked
through key_padding_mask; a pad query sees no key and gives zeros (kernels.attention's rule), never NaN.
So a left-padded sample's real-token logits equal its unpadded logits (tests/test_llm.py checks this).

KV cache. forward(..., cache=cache) appends this call's keys/values and attention mask to `cache` (in place)
and attends over everything cached: the N new queries see all cached keys and the new keys up to their own
(kernels.attention's bottom-right causal mask, Nq < Nk). attention_mask then covers only the new tokens;
the cache keeps the earlier ones. The cache grows by torch.cat (simple; O(L^2) copying over a generation,
small next to the O(L^2) attention).

Limits: sliding_window (Mistral v0.1) is accepted, but full causal attention is used, so a sequence longer
than the window is an error rather than silently different; v0.3 has no window. rope_scaling is not
supported (an error in the HF config loader). bf16: model.to(torch.bfloat16) (norm statistics in fp32,
RoPE angles in fp32, sampling in fp32).

Shapes: input_ids (B, L) long; inputs_embeds (B, L, hidden_size); logits (B, L, vocab_size).
Tests: python -m pytest tests/test_llm.py -q. Speed: python -m ivmini.llm [--batch B --prompt P --new N].
"""
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, RMSNorm


@dataclass
class LLMConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None          # None: = num_attention_heads (no GQA)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = None                 # None: finished sequences in generate() are filled with eos
    sliding_window: int = None               # accepted, not implemented: longer sequences are an error

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must divide "
                             f"hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")


LLM_PRESETS = {
    # the CPU default: trained on the synthetic world's captions and QA (stage 3, phase `lm`); ~4.7M parameters
    "tiny": LLMConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0),
    # mistralai/Mistral-7B-Instruct-v0.3 config.json (the InternVideo2-Chat-8B LLM); ~7.25B parameters
    "mistral-7b": LLMConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                            max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1,
                            eos_token_id=2, pad_token_id=None, sliding_window=None),
}


def llm_config(preset="tiny", **overrides):
    """A copy of LLM_PRESETS[preset] with fields replaced."""
    if preset not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {preset!r}; choose one of {sorted(LLM_PRESETS)}")
    return replace(LLM_PRESETS[preset], **overrides)


class LayerKV:
    """One layer's cached keys and values (B, Hkv, Nk, d); Attention calls update() once per forward."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)   # (B, Hkv, Nk + N, d)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """What generation keeps between steps: per layer k, v; the (B, Nk) bool mask of the cached tokens
    (None while every cached token is real); length = Nk, the tokens already cached."""

    def __init__(self, num_layers):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.mask = None
        self.length = 0


class LLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, norm="rms",
                  norm_eps=cfg.rms_norm_eps, num_kv_heads=cfg.num_key_value_heads, causal=True,
                  rope_theta=cfg.rope_theta, act="silu", gated=True, bias=False)
            for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """HF Llama's init: every Linear and the embedding N(0, initializer_range), norms 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.cfg.initializer_range)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight          # one Parameter: one state-dict tensor twice

    def embed(self, input_ids):
        """(B, L) ids -> (B, L, hidden): for callers that splice visual embeddings into inputs_embeds."""
        return self.embed_tokens(input_ids)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        """The final-norm hidden states (B, L, hidden) (the CLIP text tower reads its last real token)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds      # (B, L, C)
        B, L = x.shape[:2]
        past = cache.length if cache is not None else 0
        window = self.cfg.sliding_window
        if window is not None and past + L > window:
            raise ValueError(f"sequence of {past + L} tokens exceeds sliding_window={window}, which ivmini does not "
                             f"implement (it attends to all earlier tokens)")
        if attention_mask is not None and attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask must be (B, L) = {(B, L)} for the tokens of this call, "
                             f"got {tuple(attention_mask.shape)}")
        mask = None                                                 # (B, past + L) bool, None: all real
        if attention_mask is not None or (cache is not None and cache.mask is not None):
            new = (attention_mask.bool() if attention_mask is not None
                   else torch.ones(B, L, dtype=torch.bool, device=x.device))
            old = (cache.mask if cache is not None and cache.mask is not None
                   else torch.ones(B, past, dtype=torch.bool, device=x.device))
            mask = torch.cat([old, new], dim=1)
        attn_kw = {"offset": past}
        if mask is not None:
            # position = real tokens before this one (see the module docstring); pads get 0
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]   # (B, L), each < past + L
            attn_kw.update(key_padding_mask=mask, positions=positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache=cache.layers[i] if cache is not None else None, **attn_kw)   # (B, L, C)
        if cache is not None:
            cache.mask, cache.length = mask, past + L
        return self.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        """logits (B, L, vocab_size); a given cache is extended in place (see the module docstring)."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, attention_mask, cache))

    def new_cache(self):
        return KVCache(len(self.layers))

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, *, max_new_tokens=32,
                 do_sample=False, temperature=1.0, top_p=1.0, eos_token_id=None, stop_strings=None, decode=None,
                 generator=None, use_cache=True, on_token=None):
        """New token ids (B, T), T <= max_new_tokens, after a (left-padded) prompt of ids or embeddings.

        Greedy (do_sample=False) or sampling from softmax(logits / temperature) restricted to the smallest
        set of most likely tokens whose probability reaches top_p (nucleus), drawn with `generator`.
        A sample stops after emitting a stop token (eos_token_id: an int or a list; default cfg.eos_token_id)
        or once decode(its new ids) contains one of stop_strings (the tokens of the string are kept); later
        positions hold cfg.pad_token_id (eos if None). Generation ends when every sample has stopped.
        use_cache=False recomputes the whole sequence each step (the reference the cache is tested against).
        on_token: called with each step's (B,) new ids as they are made (e.g. to stream the text).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if stop_strings and decode is None:
            raise ValueError("stop_strings need decode=, a callable from a list of token ids to text")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        cfg = self.cfg
        stop_ids = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        stop_ids = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), dtype=torch.long)
        fill = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds        # (B, L, C)
        B, device = x.shape[0], x.device
        mask = (torch.ones(x.shape[:2], dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.bool())
        stop_ids = stop_ids.to(device)
        cache = self.new_cache() if use_cache else None
        step_in, step_mask = x, mask                       # what the next forward reads
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for _ in range(max_new_tokens):
            logits = self(inputs_embeds=step_in, attention_mask=step_mask, cache=cache)[:, -1].float()   # (B, V)
            token = self.next_token(logits, do_sample, temperature, top_p, generator)                # (B,)
            token = torch.where(done, torch.full_like(token, fill), token)
            out.append(token)
            if on_token is not None:
                on_token(token)
            done = done | torch.isin(token, stop_ids)
            if stop_strings:
                ids = torch.stack(out, dim=1).tolist()                                               # (B, t)
                hit = [any(s in decode(row) for s in stop_strings) for row in ids]
                done = done | torch.tensor(hit, device=device)
            if bool(done.all()):
                break
            new = self.embed(token[:, None])                                                         # (B, 1, C)
            if use_cache:
                step_in, step_mask = new, torch.ones(B, 1, dtype=torch.bool, device=device)
            else:
                step_in = torch.cat([step_in, new], dim=1)
                step_mask = torch.cat([step_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        return torch.stack(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.long, device=device)

    @staticmethod
    def next_token(logits, do_sample, temperature, top_p, generator):
        """(B, V) fp32 logits -> (B,) ids: argmax, or a draw from the temperature-scaled top-p distribution."""
        if not do_sample:
            return logits.argmax(dim=-1)
        probs = F.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p      # tokens before the mass reaches top_p, >= 1
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)   # multinomial renormalises


def generation_speed(model, batch=1, prompt=32, new=64, seed=0):
    """{use_cache: tokens/s} of greedy generation of `new` tokens after a random `prompt`-token prompt
    (eos disabled, so every run generates exactly `new` tokens per sample)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.cfg.vocab_size, (batch, prompt), generator=g).to(next(model.parameters()).device)
    speed = {}
    for use_cache in (True, False):
        model.generate(ids, max_new_tokens=2, eos_token_id=[], use_cache=use_cache)      # warm-up
        t0 = time.perf_counter()
        n = model.generate(ids, max_new_tokens=new, eos_token_id=[], use_cache=use_cache).numel()
        speed[use_cache] = n / (time.perf_counter() - t0)
    return speed


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="generation tokens/s of a random-weight LLM, with and without the cache")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = LLM(llm_config(args.preset)).eval()
    s = generation_speed(net, args.batch, args.prompt, args.new)
    print(f"{args.preset}: batch {args.batch}, prompt {args.prompt}, {args.new} new tokens: "
          f"{s[True]:.1f} tokens/s with the KV cache, {s[False]:.1f} without ({s[True] / s[False]:.1f}x)")
