// Schemas of the native ops. Kernels register per device in
// <op>_cpu.cpp (CPU key) and <op>_cuda.cu (CUDA key); fake (meta)
// implementations and autograd live in Python (reclora_kernels/*.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu_utils.h"

namespace {

// _C.cpu_isa(): the path the CPU kernels take ("avx512", "avx2" or "baseline"); ValueError when
// RECLORA_CPU_ISA names an unknown level or one this CPU lacks.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(reclora::cpu::kIsaNames[static_cast<int>(reclora::cpu::cpu_isa())]);
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
    return nullptr;
  }
}

// _C.cpu_isa_levels(): every level this CPU runs, best first, whatever RECLORA_CPU_ISA says.
PyObject* cpu_isa_levels(PyObject*, PyObject*) {
  const int best = static_cast<int>(reclora::cpu::hardware_isa());
  PyObject* levels = PyTuple_New(best + 1);
  for (int level = best; level >= 0; --level) {
    PyTuple_SET_ITEM(levels, best - level, PyUnicode_FromString(reclora::cpu::kIsaNames[level]));
  }
  return levels;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA path of the CPU kernels."},
    {"cpu_isa_levels", cpu_isa_levels, METH_NOARGS, "The ISA levels this CPU runs, best first."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// Importable as a Python module; loading it runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(reclora, m) {
  // Personalized LoRA. x: (M, d_in) tokens; gate: (B, K) float32; lora_a: (K, r, d_in);
  // lora_b: (K, d_out, r); sample_index: (M,) int64 row of gate per token, or None
  // when tokens are grouped by sample, M // B per sample. weight: (d_out, d_in) and
  // bias: (d_out,) add the base projection x W^T + bias. Returns y (M, d_out) in x's dtype, and
  // u: the LoRA activations the backward reuses, (M, r) float32 on the CPU's weight mix, else
  // x A_cat^T (M, K r) (float32 on the CPU, x's dtype on CUDA).
  m.def(
      "gated_lora_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor gate, Tensor lora_a, "
      "Tensor lora_b, Tensor? sample_index, float scaling, bool output_mix) -> (Tensor y, Tensor u)");
  // Gradients of the LoRA path, given the forward's u. grad_x also holds grad_out @ weight when
  // weight is given. grad_gate is float32; grad_lora_a/b have lora_a/b's dtype.
  m.def(
      "gated_lora_backward(Tensor grad_out, Tensor x, Tensor u, Tensor? weight, Tensor gate, Tensor lora_a, "
      "Tensor lora_b, Tensor? sample_index, float scaling, bool output_mix) "
      "-> (Tensor grad_x, Tensor grad_gate, Tensor grad_lora_a, Tensor grad_lora_b)");

  // Top-k retrieval. query: (B, d); keys: (B, L, d) dense, or (N, d) table with ids: (B, L)
  // int64; lengths: (B,) int64 valid prefix; mask: (B, L) bool. Returns scores (B, k)
  // float32 sorted descending (ties: smaller position first; missing: -inf) and index
  // (B, k) int64 positions on L (missing: -1).
  m.def(
      "retrieve_topk_forward(Tensor query, Tensor keys, Tensor? ids, Tensor? lengths, Tensor? mask, "
      "int k, float scale) -> (Tensor scores, Tensor index)");
  // grad_scores: (B, k) float32. grad_keys has keys' shape (rows not selected are zero).
  m.def(
      "retrieve_topk_backward(Tensor grad_scores, Tensor query, Tensor keys, Tensor? ids, "
      "Tensor index, float scale) -> (Tensor grad_query, Tensor grad_keys)");
  // Top-k target attention: softmax over the selected scores, weighted sum of the selected
  // values ((B, L, d_v) dense, or (N, d_v) table with the same ids). Returns pooled (B, d_v)
  // in values' dtype, index (B, k) int64, probs (B, k) float32 (0 in missing slots).
  m.def(
      "topk_attention_forward(Tensor query, Tensor keys, Tensor values, Tensor? ids, "
      "Tensor? lengths, Tensor? mask, int k, float scale) -> (Tensor pooled, Tensor index, Tensor probs)");
  m.def(
      "topk_attention_backward(Tensor grad_pooled, Tensor query, Tensor keys, Tensor values, "
      "Tensor? ids, Tensor index, Tensor probs, float scale) "
      "-> (Tensor grad_query, Tensor grad_keys, Tensor grad_values)");
}
