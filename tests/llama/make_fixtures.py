"""A tiny llama model and two LoRA adapters for the real llama-server tests, written with `gguf`.

Usage: make_fixtures.py OUT_DIR — writes OUT_DIR/{base,adapter-a,adapter-b}.gguf (deterministic:
the same bytes every run).

The weights are arranged so the output says which adapter was applied, whatever the prompt:
- every token embeds to the same vector and the block adds nothing (attention output and FFN
  down-projections are zero), so the hidden state at every position is the constant all-ones vector;
- `output.weight` gives the base's word the highest logit, by a wide margin, so greedy decoding (and
  sampling at any usual temperature) repeats it: " plain plain plain …";
- each adapter is a rank-1 LoRA on `output.weight` that lifts its own word far above the base's:
  adapter A makes it " alpha alpha …", adapter B " bravo bravo …". At scale 0 an adapter changes nothing.
End-of-sequence is never likely, so a request generates exactly `max_tokens` tokens.
"""

import sys
from pathlib import Path

import gguf
import numpy as np

# Big enough (about a millisecond a token on one thread) that a long generation lasts seconds, so a
# test can see it stop when the client goes away; small enough to write and load in a moment.
N_EMBD = 256
N_HEAD = 4
N_FF = 2048
N_CTX = 32768
MARGIN = 32.0  # logit gap between the chosen word and the next best token

# SentencePiece-style vocabulary: specials, the 256 byte-fallback tokens, then the words.
SPECIALS = [("<unk>", gguf.TokenType.UNKNOWN), ("<s>", gguf.TokenType.CONTROL), ("</s>", gguf.TokenType.CONTROL)]
BYTES = [(f"<0x{b:02X}>", gguf.TokenType.BYTE) for b in range(256)]
WORDS = ["plain", "alpha", "bravo"]  # base, adapter A, adapter B
VOCAB = SPECIALS + BYTES + [("\u2581" + w, gguf.TokenType.NORMAL) for w in WORDS]
WORD_ID = {w: len(SPECIALS) + len(BYTES) + i for i, w in enumerate(WORDS)}
TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def f32(*shape, fill=0.0):
    return np.full(shape, fill, dtype=np.float32)


def write(path, writer_setup, tensors):
    w = gguf.GGUFWriter(str(path), arch="llama")
    writer_setup(w)
    for name, data in tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def base_model(path):
    n_vocab = len(VOCAB)

    def setup(w):
        w.add_name("arkor-edge test model")
        w.add_context_length(N_CTX)
        w.add_embedding_length(N_EMBD)
        w.add_block_count(1)
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_HEAD)
        w.add_rope_dimension_count(N_EMBD // N_HEAD)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_vocab_size(n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list([t for t, _ in VOCAB])
        w.add_token_types([k for _, k in VOCAB])
        w.add_token_scores([0.0] * n_vocab)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_chat_template(TEMPLATE)

    # Rows of output.weight are dotted with the all-ones hidden state: a row of c gives logit c * N_EMBD.
    output = f32(n_vocab, N_EMBD)
    output[WORD_ID["plain"], :] = MARGIN / N_EMBD
    output[2, :] = -MARGIN / N_EMBD  # </s>: never
    tensors = [
        ("token_embd.weight", f32(n_vocab, N_EMBD, fill=1.0)),
        ("output_norm.weight", f32(N_EMBD, fill=1.0)),
        ("output.weight", output),
        ("blk.0.attn_norm.weight", f32(N_EMBD, fill=1.0)),
        ("blk.0.attn_q.weight", f32(N_EMBD, N_EMBD)),
        ("blk.0.attn_k.weight", f32(N_EMBD, N_EMBD)),
        ("blk.0.attn_v.weight", f32(N_EMBD, N_EMBD)),
        ("blk.0.attn_output.weight", f32(N_EMBD, N_EMBD)),
        ("blk.0.ffn_norm.weight", f32(N_EMBD, fill=1.0)),
        ("blk.0.ffn_gate.weight", f32(N_FF, N_EMBD)),
        ("blk.0.ffn_up.weight", f32(N_FF, N_EMBD)),
        ("blk.0.ffn_down.weight", f32(N_EMBD, N_FF)),
    ]
    write(path, setup, tensors)


def adapter(path, word):
    n_vocab = len(VOCAB)

    def setup(w):
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 1.0)  # alpha / rank = 1: the delta is B·A as written

    # delta = B · (A · h): A sums the hidden state to 1, B lifts the word by twice the base's margin.
    lora_a = f32(1, N_EMBD, fill=1.0 / N_EMBD)
    lora_b = f32(n_vocab, 1)
    lora_b[WORD_ID[word], 0] = 2 * MARGIN
    write(path, setup, [("output.weight.lora_a", lora_a), ("output.weight.lora_b", lora_b)])


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    base_model(out / "base.gguf")
    adapter(out / "adapter-a.gguf", "alpha")
    adapter(out / "adapter-b.gguf", "bravo")
    print(out)


if __name__ == "__main__":
    main()
