"""Offline generation: `python -m model.generate --model PATH --prompt "..."` streams text to stdout.

One sequence in cache slot 0, no server and no engine thread: model/ code only (the checkpoint
loader, the sampler, the tokenizer). Useful to check a checkpoint by eye and as the plainest example of
the prefill-then-decode loop.
"""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads collapse throughput when the CPU is shared; set before torch starts them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Iterator, Sequence  # noqa: E402

import torch  # noqa: E402

from model.chat import default_system_prompt, detect_chat_format, end_of_turn_ids, render_chat  # noqa: E402
from model.checkpoint import CheckpointError, LoadedModel, load_model  # noqa: E402
from model.quant import QUANTIZATIONS  # noqa: E402
from model.llama import Transformer  # noqa: E402
from model.sampling import Sampler, SamplingParamError, SamplingParams, validate_sampling  # noqa: E402
from model.tokenizer import IncrementalDetokenizer  # noqa: E402


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    max_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    prefill_chunk: int = 256,
) -> Iterator[int]:
    """Yield generated ids one at a time (a stop id is yielded, then generation ends)."""
    device = model.tok_embeddings.weight.device
    sampler = Sampler(1, model.args.vocab_size, device)
    sampler.set_slot(0, params, prompt_ids)
    tokens = list(prompt_ids)
    logits = None
    for start in range(0, len(tokens), prefill_chunk):  # chunked prefill bounds the activation memory
        chunk = tokens[start : start + prefill_chunk]
        logits = model(torch.tensor([chunk], device=device), torch.arange(start, start + len(chunk), device=device)[None])
    for _ in range(max_tokens):
        assert logits is not None
        token = sampler.sample(logits, [0]).token_ids[0]
        yield token
        if token in stop_ids or len(tokens) >= model.max_seq_len:
            return
        tokens.append(token)
        position = torch.tensor([[len(tokens) - 1]], device=device)
        logits = model(torch.tensor([[token]], device=device), position, kv_len=len(tokens))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GGUF file, HF directory or Meta checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the model's chat format")
    parser.add_argument("--bos", action="store_true", help="prepend BOS to a plain prompt")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                        help="int4 weights for decode on CPU; auto: for a Q4_1 GGUF (as the server)")
    return parser.parse_args(argv)


def prompt_ids(loaded: LoadedModel, text: str, chat: bool, bos: bool) -> tuple[list[int], frozenset[int]]:
    """The prompt ids and the ids that end the reply."""
    tokenizer = loaded.tokenizer
    stops = set(tokenizer.stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    if not chat:
        return tokenizer.encode(text, bos=bos), frozenset(stops)
    fmt = detect_chat_format(loaded.chat_template, tokenizer)
    system = default_system_prompt(loaded.chat_template) if fmt == "chatml" else None
    ids = render_chat([{"role": "user", "content": text}], tokenizer, fmt, default_system=system)
    return ids, frozenset(stops | end_of_turn_ids(fmt, tokenizer))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        loaded = load_model(args.model, max_batch_size=1, max_seq_len=args.max_seq_len, quantization=args.quantization)
        validate_sampling(params, loaded.args.vocab_size)
    except (CheckpointError, SamplingParamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids, stop_ids = prompt_ids(loaded, args.prompt, args.chat, args.bos)
    max_seq_len = loaded.model.max_seq_len
    if not ids or args.max_tokens < 0 or len(ids) + args.max_tokens > max_seq_len:
        print(f"error: need 1 <= prompt tokens ({len(ids)}) and prompt + max tokens ({args.max_tokens}) <= {max_seq_len}", file=sys.stderr)
        return 2
    detokenizer = IncrementalDetokenizer(loaded.tokenizer)
    start, count, first = time.perf_counter(), 0, None
    for token in generate_tokens(loaded.model, ids, params, max_tokens=args.max_tokens, stop_ids=stop_ids):
        first = first or time.perf_counter()
        count += 1
        if token not in stop_ids:
            sys.stdout.write(detokenizer.push(token))
            sys.stdout.flush()
    sys.stdout.write(detokenizer.flush() + "\n")
    end = time.perf_counter()
    if first is not None:
        decode_rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
        print(f"[{len(ids)} prompt tokens, {count} generated, first token {first - start:.2f} s, {decode_rate:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
