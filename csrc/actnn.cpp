// Op schemas, registered once; kernels live in cpu/ and cuda/, the shape (fake) implementations
// and the pure-PyTorch reference in actnn_mm/compress/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(actnn_mm, m) {
  // x: (N, M) contiguous float32/float16/bfloat16; bits: (N,) uint8; offsets: (N + 1,) int64 byte
  // offsets of each sample's packed stream. Returns (data: uint8[total_bytes], meta: uint8[groups,
  // 2] codes of each group's min and scale, sample_meta: float32[N, 2] min and range of each
  // sample; see csrc/common/codec.h).
  m.def(
      "quantize(Tensor x, Tensor bits, Tensor offsets, int group_size, int seed, bool stochastic, "
      "SymInt total_bytes) -> (Tensor, Tensor, Tensor)");
  // Returns the (num_samples, sample_size) tensor of dtype `dtype`.
  m.def(
      "dequantize(Tensor data, Tensor meta, Tensor sample_meta, Tensor bits, Tensor offsets, "
      "SymInt num_samples, SymInt sample_size, int group_size, ScalarType dtype) -> Tensor");
  // dequantize of samples quantized as (rows, cols) row-major matrices, each returned transposed:
  // (num_samples, cols, rows), e.g. an NCHW activation (rows = C, cols = H * W) in channels_last.
  m.def(
      "dequantize_transposed(Tensor data, Tensor meta, Tensor sample_meta, Tensor bits, "
      "Tensor offsets, SymInt num_samples, SymInt rows, SymInt cols, int group_size, "
      "ScalarType dtype) -> Tensor");
  // Exact packing of small integers (masks, indices): values: contiguous uint8 or bool, each
  // below 2^bits; value i goes to bits [(i % k) * bits, ...) of byte i / k, k = 8 / bits.
  m.def("pack_bits(Tensor values, int bits) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, SymInt numel) -> Tensor");
  // pack_bits(values > 0, 1) in one pass (ReLU's mask): values: contiguous float32/float16/
  // bfloat16; a NaN is not positive.
  m.def("pack_positive(Tensor values) -> Tensor");
  // Backward of a masking op (ReLU, dropout) in one pass: values: contiguous float32/float16/
  // bfloat16; mask: pack_bits(..., 1) of values.numel() booleans. Returns values * scale where
  // the mask is set and 0 elsewhere (the product in float32).
  m.def("apply_mask(Tensor values, Tensor mask, float scale) -> Tensor");
  // apply_mask of (N, cols, rows) values whose mask is in (N, rows, cols) order, e.g. a
  // channels_last gradient and the mask of an NCHW activation.
  m.def("apply_mask_transposed(Tensor values, Tensor mask, float scale) -> Tensor");
  // Training-mode BatchNorm backward from the normalized input xh, in two passes over the
  // gradient and xh as contiguous (rows, channels) tensors of one shape and float dtype (e.g. a
  // channels_last (N, C, H, W) pair as (N * H * W, C)). batch_norm_sums: float32 (3, channels)
  // per-channel sums of grad, grad * xh and xh * xh. batch_norm_combine: xh = coef[0] * xh +
  // coef[1] * grad + coef[2] per channel (coef: float32 (3, channels)), in place.
  m.def("batch_norm_sums(Tensor grad, Tensor xh) -> Tensor");
  m.def("batch_norm_combine(Tensor(a!) xh, Tensor grad, Tensor coef) -> ()");
  // Per-sample statistics of the adaptive allocator (actnn_mm/allocate.py), each read from a
  // sample of the rows of a contiguous (N, M) float32/float16/bfloat16 tensor; float64 (N,).
  // mean_square_range: the mean over every ceil(G / max_groups)-th of a row's G full groups of
  // group_size values (a row shorter than one group: the row) of the group's (max - min)^2.
  // sum_of_squares: a row's sum of squares, estimated from `blocks` blocks of max_values / blocks
  // values starting every M / blocks values (a row of at most max_values: exact). A non-finite
  // value read makes its row's statistic non-finite.
  m.def("mean_square_range(Tensor x, int group_size, int max_groups) -> Tensor");
  m.def("sum_of_squares(Tensor x, int max_values, int blocks) -> Tensor");
  // Max pooling's argmax as its position in its window (row-major over the kernel, in dilation
  // steps) and back. indices: contiguous int64 (P, OH, OW, K) flat indices into input planes
  // `width` wide, output position (oh, ow) at dims 1 and 2 (an NCHW tensor viewed as
  // (N * C, OH, OW, 1), a channels_last one permuted to (N, OH, OW, C)); kernel, stride,
  // padding, dilation: (rows, columns). window_offsets returns `dtype` (uint8 for windows of up
  // to 256 positions, or int32) of the same shape; window_indices the int64 indices.
  m.def(
      "window_offsets(Tensor indices, int width, int[] kernel, int[] stride, int[] padding, "
      "int[] dilation, ScalarType dtype) -> Tensor");
  m.def(
      "window_indices(Tensor offsets, int width, int[] kernel, int[] stride, int[] padding, "
      "int[] dilation) -> Tensor");
}

// Importing actnn_mm._C runs the registrations above; the module itself is empty but says
// whether the CUDA kernels were built.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
