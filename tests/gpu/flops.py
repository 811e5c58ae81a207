"""Training FLOPs per image of SimplEsT-ViT and SimpleViT, and MFU (the formula of docs/gpu-validation.md).

Matmul FLOPs only (elementwise ops, softmax, norms and the optimizer are not counted), 2 FLOPs per multiply-add;
a training step is the forward pass plus a backward pass of twice its FLOPs (input and weight gradients):

  N = (image / patch)^2 tokens, D width, M MLP width, L blocks, K = channels * patch^2, C classes
  per-block weight matmuls (multiply-adds per token):
      SimplEsT-ViT: 3 D^2 (qkv) + 2 D M (MLP)            (no output projection)
      SimpleViT:    3 D^2 (qkv) + D^2 (to_out) + 2 D M
  attention per block and image: Q K^T and P V, N^2 D multiply-adds each  -> 2 N^2 D
  forward FLOPs per image = 2 [ N K D  +  L N (block weights)  +  2 L N^2 D  +  D C ]
  training FLOPs per image = 3 x forward, except the patch embedding (no input gradient: 2 x its forward)
      = 6 N (L P_block + D C / N) + 12 L N^2 D + 4 N K D
  i.e. the usual 6 * params * tokens plus the 12 L D N^2 attention term.

MFU = images/s x training FLOPs per image / peak, peak = 989 TFLOP/s (dense bf16, H100 SXM and H200 SXM spec).
For ViT-S/16 at 224 px (N 196, D 384, M 1536, L 12, 1000 classes): SimpleViT 27.3 GFLOP per image, SimplEsT-ViT
25.2 GFLOP per image.
"""

PEAK_BF16_TFLOPS = 989.0

WIDTHS = {"ti": (192, 3, 768, 12), "s": (384, 6, 1536, 12), "b": (768, 12, 3072, 12)}


def train_flops_per_image(arch, image=224, patch=16, channels=3, dim=384, depth=12, mlp=1536, classes=1000):
    N = (image // patch) ** 2
    K = channels * patch * patch
    D, M, L = dim, mlp, depth
    block = 3 * D * D + 2 * D * M + (D * D if arch == "simplevit" else 0)
    fwd_dense = N * L * block + D * classes  # multiply-adds, per image
    attn = 2 * L * N * N * D
    patch_macs = N * K * D
    return 6.0 * (fwd_dense + attn) + 4.0 * patch_macs


def mfu(img_per_s, flops_per_image, peak_tflops=PEAK_BF16_TFLOPS):
    return img_per_s * flops_per_image / (peak_tflops * 1e12)


if __name__ == "__main__":
    for arch in ("simplest", "simplevit"):
        f = train_flops_per_image(arch)
        print("%s ViT-S/16 224px: %.2f GFLOP per training image; 8000 img/s = %.1f %% MFU"
              % (arch, f / 1e9, 100 * mfu(8000, f)))
