"""Offline generation: `python -m model.generate --model PATH --prompt "..."` streams text to stdout.

One sequence in cache slot 0, no server and no engine thread: model/ code only (the checkpoint
loader, the sampler, the tokenizer). Useful to check a checkpoint by eye and as the plainest example of
the prefill-then-decode loop.

torch, and the modules that import it, are imported inside the functions: `python -m` runs this
module's imports before main(), and main() must set the OpenMP policy before torch loads (model/threads.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Iterator, Sequence

from model.chat import default_system_prompt, detect_chat_format, end_of_turn_ids, render_chat
from model.errors import CheckpointError
from model.fetch import add_cache_dir_flag
from model.threads import configure_threads
from model.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from model.checkpoint import LoadedModel
    from model.llama import Transformer
    from model.sampling import SamplingParams


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
    import torch

    from model.sampling import Sampler

    @torch.inference_mode()  # while the generator runs, not while the caller handles a token
    def steps() -> Iterator[int]:
        device = model.device
        sampler = Sampler(1, model.vocab_size, device)
        sampler.set_slot(0, params, prompt_ids)
        tokens = list(prompt_ids)
        logits = None
        for start in range(0, len(tokens), prefill_chunk):  # chunked prefill bounds the activation memory
            chunk = tokens[start : start + prefill_chunk]
            positions = torch.arange(start, start + len(chunk), device=device)[None]
            logits = model(torch.tensor([chunk], device=device), positions)
        for _ in range(max_tokens):
            assert logits is not None
            token = sampler.sample(logits, [0]).token_ids[0]
            yield token
            if token in stop_ids or len(tokens) >= model.max_seq_len:
                return
            tokens.append(token)
            position = torch.tensor([[len(tokens) - 1]], device=device)
            logits = model(torch.tensor([[token]], device=device), position, kv_len=len(tokens))

    return steps()


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
    parser.add_argument(
        "--quantization",
        default="auto",  # checked by load_model (model/quant.py)
        help="none, int4 (weights for decode on CPU) or auto: int4 for a Q4_1 GGUF (as the server)",
    )
    add_cache_dir_flag(parser)
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
    configure_threads(args.threads)
    from model.checkpoint import load_model  # torch loads here, after the thread policy is set
    from model.sampling import SamplingParamError, SamplingParams, validate_sampling

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        loaded = load_model(
            args.model, max_batch_size=1, max_seq_len=args.max_seq_len, quantization=args.quantization, cache_dir=args.cache_dir
        )
        validate_sampling(params, loaded.args.vocab_size)
    except (CheckpointError, SamplingParamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids, stop_ids = prompt_ids(loaded, args.prompt, args.chat, args.bos)
    max_seq_len = loaded.model.max_seq_len
    if not ids or args.max_tokens < 0 or len(ids) + args.max_tokens > max_seq_len:
        need = f"1 <= prompt tokens ({len(ids)}) and prompt + max tokens ({args.max_tokens}) <= {max_seq_len}"
        print(f"error: need {need}", file=sys.stderr)
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
        summary = f"{len(ids)} prompt tokens, {count} generated, first token {first - start:.2f} s, {decode_rate:.1f} tok/s"
        print(f"[{summary}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
