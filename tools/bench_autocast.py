"""What encoder.compute_dtype=bfloat16 buys: the encoder's forward + backward (a training step's encoder part) and its
forward alone (an encoding pass), float32 against bfloat16 autocast, on the same weights and batches, in one run;
the ratios and how far the embeddings move. Batches are padded like real ones (a share of the rows end early).
Then one query through the served encoder (the plain BERT a loaded model runs): float32, bfloat16 autocast over
float32 weights, and bfloat16 with the Linear weights cast once (what a loaded model does).

On a CPU the bfloat16 matmuls need AMX or AVX512-BF16 to be fast (printed); without them autocast is slower.

    python tools/bench_autocast.py --batch 64 --tokens 32 --repeats 5
"""

from __future__ import annotations

import argparse
import copy

import torch

from astra_ds.config import EncoderConfig
from astra_ds.encoder.encoder import MINILM, QueryEncoder, cpu_has_bf16
from bench_scaling import median_time  # tools/, the directory of this script, is on its path


def bf16_hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return {True: "a CPU with AMX or AVX512-BF16", False: "a CPU without bfloat16 instructions",
            None: "a CPU (its instructions unknown)"}[cpu_has_bf16()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--batch", type=int, default=64, help="queries a training step encodes")
    parser.add_argument("--encode-batch", type=int, default=256, help="queries an encoding pass encodes at once")
    parser.add_argument("--tokens", type=int, default=32, help="tokens of the longest query of a batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = {precision: QueryEncoder(EncoderConfig(model=args.model, compute_dtype=precision), 10).to(device)
                for precision in ("float32", "bfloat16")}
    encoders["bfloat16"].load_state_dict(encoders["float32"].state_dict())

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.randint(1000, 20000, (size, args.tokens), device=device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[size // 2:, args.tokens // 2:] = 0  # half the queries half as long
        return input_ids, attention_mask

    train_batch, encode_batch = batch(args.batch), batch(args.encode_batch)
    print(f"{args.model} on {bf16_hardware()}, {torch.get_num_threads()} threads; {args.batch} x {args.tokens} "
          f"tokens a step, {args.encode_batch} an encoding batch; median of {args.repeats}")
    seconds = {}
    for precision, encoder in encoders.items():
        def step():
            encoder.zero_grad(set_to_none=True)
            encoder(*train_batch)[0].square().sum().backward()

        def encode():
            with torch.no_grad():
                encoder(*encode_batch)

        seconds[precision] = (median_time(lambda _: step(), args.repeats, warmup=1),
                              median_time(lambda _: encode(), args.repeats, warmup=1))
    served = {precision: QueryEncoder(EncoderConfig(model=args.model, compute_dtype=precision), 10,
                                      for_weights=True).to(device).eval() for precision in ("float32", "bfloat16")}
    for encoder in served.values():
        encoder.load_state_dict(encoders["float32"].state_dict())
    served["cast once"] = copy.deepcopy(served["bfloat16"]).cast_for_inference()
    one_query = batch(1)
    query_seconds = {}
    for name, encoder in served.items():
        with torch.no_grad():
            query_seconds[name] = median_time(lambda _: encoder(*one_query), 10 * args.repeats, warmup=3)
    with torch.no_grad():
        moved = (encoders["bfloat16"](*encode_batch)[0] - encoders["float32"](*encode_batch)[0]).abs().max().item()
    print(f"{'':24}{'float32 ms':>12}{'bfloat16 ms':>12}{'ratio':>8}")
    for i, name in enumerate(["forward + backward", "forward (encoding)"]):
        fp32, bf16 = seconds["float32"][i], seconds["bfloat16"][i]
        print(f"{name:24}{1000 * fp32:12.2f}{1000 * bf16:12.2f}{fp32 / bf16:8.2f}")
    print(f"largest change of an embedding entry (unit-norm embeddings): {moved:.2e}")
    fp32_query = query_seconds["float32"]
    print("one query, served: " + ", ".join(f"{name} {1000 * took:.2f} ms ({fp32_query / took:.2f}x)"
                                          for name, took in query_seconds.items()))


if __name__ == "__main__":
    main()
