"""Compile the Triton conv kernels for the H100 (sm_90) without a GPU.

``python -m tests.kernels.conv2d_bn_sm90`` compiles every variant of VARIANTS with the
launch configuration the GPU launchers choose (tile sizes, dot dtypes, warps,
pipeline stages: the functions of resfast.kernels.configs) to a cubin,
with the ptxas Triton ships, and prints one JSON line per variant. It must run
with TRITON_INTERPRET=0 (under the interpreter ``triton.jit`` gives functions
the compiler cannot take), hence a separate process; tests/kernels/test_conv2d_bn_sm90.py
runs it and checks the lines.
"""
import json
import os
import re
import sys
import time

# (name, input channels, output channels, kernel size, stride, input side, flags):
# ResNet-50 layers at batch 128 that pick different tiles and code paths, each
# with the fusions it carries in the networks (a fused 3x3 with the previous BN
# in its prologue and statistics out; an eval 1x1 with bias and ReLU folded in;
# the 7x7 stem over 3 channels). The sizes matter: like a launch, the compile
# knows which integer arguments are multiples of 16 (Triton's specialization),
# which decides vector widths and whether loads can be pipelined.
BATCH = 128
SHAPES = [
    ("3x3s1-64-64-fused", 64, 64, 3, 1, 56, "fused"),
    ("1x1s2-256-512-plain", 256, 512, 1, 2, 56, "plain"),
    ("7x7s2-3-64-stem", 3, 64, 7, 2, 224, "stem"),
]
KERNELS = ("forward", "dgrad", "wgrad")
DTYPES = ("bf16", "fp16", "fp32", "fp64")
VARIANTS = [f"{kernel}-{dtype}-{shape[0]}" for kernel in KERNELS for dtype in DTYPES
            for shape in SHAPES]
# The small kernels that finish a conv (resfast/kernels/partials.py): the merge of the
# statistics (float32 / float64 partials) and the sum of wgrad partials into each dtype.
FINISHING = ["merge-fp32", "merge-fp64", "sum-fp32-bf16", "sum-fp32-fp16", "sum-fp32-fp32",
             "sum-fp64-fp64"]
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block can opt into on an H100


def _flags(kernel: str, kind: str) -> dict:
    fused, stem = kind == "fused", kind == "stem"
    if kernel == "forward":
        return dict(HAS_BIAS=kind == "plain", HAS_AFFINE=fused, IN_RELU=fused,
                    OUT_RELU=kind == "plain", STATS=kind != "plain")
    grads = dict(HAS_GY=True, HAS_GMEAN=kind != "plain", HAS_GVAR=kind != "plain",
                 OUT_RELU=kind == "plain")
    if kernel == "dgrad":
        return grads
    return dict(grads, HAS_AFFINE=fused, IN_RELU=fused, WANT_W=True, WANT_B=not stem)


def _compile(variant: str) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import resfast.kernels.conv2d_bn as K
    from resfast.dtypes import stats_dtype
    from resfast.kernels import configs

    kernel_name, dtype_name, shape_name = variant.split("-", 2)
    _, ci, co, k, stride, side, kind = next(s for s in SHAPES if s[0] == shape_name)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
             torch.float64: "fp64"}
    dtype = next(t for t, name in names.items() if name == dtype_name)
    stats_name = names[stats_dtype(dtype)]
    conv = dict(KSIZE=k, STRIDE=stride, PAD=k // 2, DIL=1,
                **configs.dot_config(dtype).constexprs())
    flat = configs.fold_taps(ci)
    n_red = k * k * ci if flat else ci  # what one K step of the forward and wgrad reduces
    if kernel_name == "forward":
        fn, tiles = K._conv2d_bn_forward_kernel, configs.gemm_tiles(co, n_red, dtype)
        tile = tiles.block_m * tiles.block_n
        layout = dict(FLAT_K=flat, GROUP_M=configs.group_m())
    elif kernel_name == "dgrad":
        fn, tiles = K._conv2d_bn_dgrad_kernel, configs.gemm_tiles(ci, co, dtype)
        tile = tiles.block_m * tiles.block_n
        layout = dict(GROUP_M=configs.group_m())
    else:
        fn, tiles = K._conv2d_bn_wgrad_kernel, configs.wgrad_tiles(co, n_red, dtype)
        tile = tiles.block_co * tiles.block_ci
        layout = dict(FLAT_K=flat)
    blocks = tiles.constexprs()
    constexprs = dict(conv, **_flags(kernel_name, kind), **blocks, **layout)
    # per-channel vectors and partial sums are in the statistics dtype, tensors in the input dtype
    stats_ptrs = {"scale_ptr", "shift_ptr", "part_mean_ptr", "part_m2_ptr", "gmean_ptr", "gvar_ptr",
                  "mean_ptr", "gw_part_ptr", "gb_part_ptr"}
    out_side = (side + 2 * (k // 2) - k) // stride + 1
    ints = dict(H=side, W=side, Ci=ci, OH=out_side, OW=out_side, Co=co, M=BATCH * out_side ** 2,
                M_in=BATCH * side ** 2, count=BATCH * out_side ** 2,
                rows_per_split=blocks["BLOCK_M"] * 8,  # a whole number of row blocks
                # a channels_last weight, as the launchers pass it
                w_s_co=k * k * ci, w_s_kh=k * ci, w_s_kw=ci)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + (stats_name if name in stats_ptrs else dtype_name)
            divisible = True  # torch's allocations are aligned
        else:
            signature[name] = "i32"
            divisible = ints[name] % 16 == 0
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(fn.arg_names)
    assert not missing, f"{variant}: constexprs {missing} are not parameters of {fn.__name__}"
    options = configs.launch_options(tile, dtype).kwargs()
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs,
                                        attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    ttgir = compiled.asm["ttgir"]
    return dict(variant=variant, ok=True, seconds=round(time.perf_counter() - start, 2),
                shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                cubin_bytes=len(compiled.asm["cubin"]),
                wgmma="warp_group_dot" in ttgir,
                # wgmma's A operand read from shared memory (a memdesc), not from registers
                a_from_shared=bool(re.search(r"warp_group_dot [^\n]*\} : !ttg\.memdesc", ttgir)),
                async_copies=ttgir.count("async_copy_global_to_local"),
                blocks=blocks, options=options)


def _compile_finishing(variant: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import resfast.kernels.partials as P
    from resfast.kernels import configs

    kind, part, *out = variant.split("-")
    tiles = configs.reduce_tiles()
    if kind == "merge":
        fn = P._merge_tile_stats_kernel
        signature = dict(part_mean_ptr=f"*{part}", part_m2_ptr=f"*{part}", mean_ptr=f"*{part}",
                         var_ptr=f"*{part}", M="i32", Co="i32", n_tiles="i32")
        constexprs = dict(ROWS_PER_TILE=128, BLOCK_T=tiles.block_t, BLOCK_C=tiles.block_c)
    else:
        fn = P._sum_partials_kernel
        signature = dict(part_ptr=f"*{part}", out_ptr=f"*{out[0]}", splits="i32", n="i32",
                         Ci="i32", s_co="i32", s_ci="i32", s_kh="i32", s_kw="i32")
        constexprs = dict(KSIZE=3, BLOCK=tiles.block)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    signature = {name: signature[name] for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return dict(variant=variant, ok=True, shared=compiled.metadata.shared,
                cubin_bytes=len(compiled.asm["cubin"]))


def main(variants) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0: the interpreter's triton.jit cannot be compiled",
              file=sys.stderr)
        return 2
    for variant in variants:
        try:
            line = (_compile_finishing(variant) if variant.split("-")[0] in ("merge", "sum")
                    else _compile(variant))
        except Exception as e:  # reported per variant; the test names it
            line = dict(variant=variant, ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or VARIANTS + FINISHING))
