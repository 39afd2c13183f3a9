"""Make the end-to-end run's model, tokenizer and data, deterministically and without a hub.

    python e2e/make_assets.py OUT_DIR [--seed 0]

writes
  OUT_DIR/model/     a random-weight Qwen3-MoE (transformers `save_pretrained`, bf16 safetensors) with a
                     byte-level BPE tokenizer trained here on the task's own text, and a chat template;
  OUT_DIR/data/      train.parquet and val.parquet in verl's RL dataset format (`data_source`, `prompt` as
                     chat messages, `ability`, `reward_model.ground_truth`, `extra_info`);
  OUT_DIR/assets.json  what was made (sizes, seed, the router skew).

The task: "repeat the letter X". The reward (e2e/reward.py) is the share of the response's letters that
are X, so even a random policy gets rewards that differ between the responses to one prompt and GRPO has
non-zero advantages (with all-equal rewards every gradient would be zero and on/off would agree trivially).

The router is skewed on purpose, as trained MoE routers are (../shared/traces: hot experts take several
times the mean): every token embedding shares one direction `u`, and each expert's gate row gets
`skew[e] * u`, so the experts that Megatron places on EP rank 0 draw most tokens. Per-token noise keeps
micro-batches different from each other.
"""
from __future__ import annotations

import argparse
import json
import os
import random

# Model shape: small enough for vLLM and two Megatron ranks on 2 CPU cores, Qwen3-MoE's real structure
# (GQA attention with q/k norms, every layer MoE, softmax top-k router with normalised top-k weights).
SHAPE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=512, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=10000.0,
             rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
             router_aux_loss_coef=0.0)
VOCAB = 384
# gate-row weight along the shared direction, per expert: experts 0-3 are EP rank 0's under Megatron's
# identity placement at EP 2, so rank 0 gets most of the routed pairs
SKEW = [2.4, 2.0, 1.6, 1.2, 0.0, 0.0, 0.0, 0.0]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def prompt_text(letter: str, n: int) -> str:
    return f"Repeat the letter {letter} {n} times: {' '.join([letter] * 2)} ..."


def make_rows(rng: random.Random, count: int, split: str) -> list[dict]:
    rows = []
    for i in range(count):
        letter = rng.choice(LETTERS)
        n = rng.randint(3, 12)
        rows.append({
            "data_source": "relibra_e2e/repeat_letter",
            "prompt": [{"role": "user", "content": prompt_text(letter, n)}],
            "ability": "repeat",
            "reward_model": {"style": "rule", "ground_truth": letter},
            "extra_info": {"split": split, "index": i},
        })
    return rows


def corpus(rng: random.Random) -> list[str]:
    """Text the tokenizer is trained on: the prompts' vocabulary plus letter runs a policy may write."""
    out = []
    for _ in range(3000):
        letter = rng.choice(LETTERS)
        out.append(prompt_text(letter, rng.randint(1, 20)))
        out.append(" ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 16))))
        out.append(letter * rng.randint(1, 8))
    return out


def make_tokenizer(rng: random.Random, model_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(rng), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    return fast


def make_model(seed: int, tokenizer, model_dir: str) -> dict:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16", **SHAPE)
    model = Qwen3MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    H = cfg.hidden_size
    u = torch.randn(H, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * 0.02 + 0.05 * u)
        skew = torch.tensor(SKEW[:cfg.num_experts])
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight                                        # [E, H]
            gate.copy_(torch.randn(gate.shape, generator=gen) * 0.02 + skew[:, None] * u[None, :] * 0.3)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"params": sum(p.numel() for p in model.parameters()), **{k: SHAPE[k] for k in (
        "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "moe_intermediate_size")},
        "vocab_size": cfg.vocab_size, "router_skew": SKEW}


def write_parquet(rows: list[dict], path: str) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=64, help="training prompts")
    ap.add_argument("--val", type=int, default=8, help="validation prompts (greedy rollout compared on/off)")
    a = ap.parse_args(argv)
    model_dir, data_dir = os.path.join(a.out, "model"), os.path.join(a.out, "data")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    rng = random.Random(a.seed)
    tok = make_tokenizer(rng, model_dir)
    info = {"seed": a.seed, "model": make_model(a.seed, tok, model_dir)}
    write_parquet(make_rows(rng, a.train, "train"), os.path.join(data_dir, "train.parquet"))
    write_parquet(make_rows(rng, a.val, "val"), os.path.join(data_dir, "val.parquet"))
    info["data"] = {"train": a.train, "val": a.val}
    with open(os.path.join(a.out, "assets.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
