"""Weight quantization: fewer bits per weight, so fewer bytes to read for each generated token.

    quantize.py   the quantizers (symmetric, asymmetric, fp8; per tensor, channel or group) and `dequantize`
    packing.py    two int4 values per byte
    linear.py     Int8Linear, Int4Linear, Fp8Linear and `quantize_model`, which swaps them into a model;
                  `quantize_head`, the LM head to int8 (load(head="int8")); `use_int8_dot` (kernels="int8-dot")
    int8_dot.py   int4/int8 weights times int8-quantized activations on the CPU: integer dot products in a
                  small C kernel (int8_dot.c), built at first use
    evaluate.py   a quantized model against the fp32 one: perplexity, KL, top-1 agreement

`llmlab.load(weights="int8" | "int4" | "fp8")` calls `quantize_model`. The GGUF block formats the
shipped model is stored in (Q8_0, Q4_0, Q4_1) are read, and their byte layouts explained, in
`llmlab/gguf.py`. `evaluate` is imported on its own (`from llmlab.quant.evaluate import ...`): it
reads the Shakespeare corpus through `llmlab.bench`, which imports the engine that imports this package.
"""

from .linear import Fp8Linear, Int4Linear, Int8Linear, quantize_head, quantize_model, use_int8_dot
from .packing import pack_int4, unpack_int4
from .quantize import dequantize, quantize_asymmetric, quantize_fp8, quantize_symmetric

__all__ = ["Fp8Linear", "Int4Linear", "Int8Linear", "dequantize", "pack_int4", "quantize_asymmetric",
           "quantize_fp8", "quantize_head", "quantize_model", "quantize_symmetric", "unpack_int4", "use_int8_dot"]
