// topk_distill::shard_pass called the way torch calls it - through the dispatcher, from C++
// with no Python - and checked against the same quantities computed with plain ATen ops in
// float64 (meanings: the schema comments in csrc/registration.cpp).
//
// Built and run by CMake/CTest (`make test`): links libtopk_distill_ops, whose static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL initializers register the ops when it loads.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int g_passed = 0;
int g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Compares `got` (any float dtype) with the float64 `want`, elementwise, like torch.testing.
void check_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                 const std::string& what) {
  if (got.sizes() != want.sizes()) {
    check(false, what + ": shape " + c10::str(got.sizes()) + ", expected " + c10::str(want.sizes()));
    return;
  }
  auto g = got.to(at::kDouble);
  auto err = (g - want).abs();
  auto tol = want.abs() * rtol + atol;
  bool finite = g.isfinite().all().item<bool>() && want.isfinite().all().item<bool>();
  bool ok = finite && (err <= tol).all().item<bool>();
  if (!ok) {
    std::printf("  %s: max |diff| = %.3g (finite: %d)\n  got:\n%s\n  expected:\n%s\n", what.c_str(),
                err.max().item<double>(), int(finite), c10::str(g).c_str(), c10::str(want).c_str());
  }
  check(ok, what);
}

using ShardPassFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, bool,
    int64_t);

c10::TypedOperatorHandle<ShardPassFn> shard_pass_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("topk_distill::shard_pass", "")
      .typed<ShardPassFn>();
}

// Reference in float64 with plain ATen ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reference(const at::Tensor& logits, const at::Tensor& ids,
                                                         int64_t vocab_start, double inv_t) {
  const int64_t V = logits.size(1);
  auto x = logits.to(at::kDouble) * inv_t;                       // [N, V]
  auto row_max = std::get<0>(x.max(1));                          // [N]
  auto e = (x - row_max.unsqueeze(1)).exp();                     // [N, V]
  auto id = ids.to(at::kLong);
  auto local = id - vocab_start;
  auto in_shard = (id >= 0) & (local >= 0) & (local < V);        // [N, K]
  auto safe = at::where(in_shard, local, at::zeros_like(local));
  // How many entries of the row point at each column of this shard.
  auto count = at::zeros_like(x).scatter_add(1, safe, in_shard.to(at::kDouble));
  auto is_teacher = count > 0;
  auto rest = (e * (~is_teacher).to(at::kDouble)).sum(1);
  auto teach = (e * is_teacher.to(at::kDouble)).sum(1);
  auto dup = (e * (count - 1).clamp_min(0)).sum(1);
  auto cols = is_teacher.to(at::kDouble).sum(1);                 // distinct teacher columns
  auto ent = (e * (x - row_max.unsqueeze(1))).sum(1);            // with_entropy
  auto sums = at::stack({rest, teach, dup, cols, ent}, 1);       // [N, 5]
  auto gathered = at::where(in_shard, x.gather(1, safe), at::zeros_like(x.gather(1, safe)));
  return {row_max, sums, gathered};
}

void run_case(const std::string& name, const at::Tensor& logits, const at::Tensor& ids, int64_t vocab_start,
              double inv_t, double rtol, double atol) {
  const int failed_before = g_failed;
  auto op = shard_pass_op();
  at::Tensor row_max, sums, gathered, topk_values, topk_ids;
  try {
    std::tie(row_max, sums, gathered, topk_values, topk_ids) =
        op.call(logits, ids, std::nullopt, vocab_start, inv_t, /*with_entropy=*/true, /*topk=*/0);
  } catch (const std::exception& ex) {
    check(false, name + ": shard_pass threw: " + ex.what());
    return;
  }
  auto [want_max, want_sums, want_gathered] = reference(logits, ids, vocab_start, inv_t);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = logits.size(0), K = ids.size(1);
  check(row_max.scalar_type() == acc && sums.scalar_type() == acc && gathered.scalar_type() == acc,
        name + ": outputs are in the acc dtype (" + std::string(c10::toString(acc)) + "), got " +
            c10::toString(row_max.scalar_type()) + "/" + c10::toString(sums.scalar_type()) + "/" +
            c10::toString(gathered.scalar_type()));
  check(row_max.device() == logits.device() && sums.device() == logits.device() &&
            gathered.device() == logits.device(),
        name + ": outputs on the logits' device");
  check(row_max.sizes() == at::IntArrayRef{N} && sums.sizes() == at::IntArrayRef{N, 5} &&
            gathered.sizes() == at::IntArrayRef{N, K} && topk_ids.sizes() == at::IntArrayRef{N, 0},
        name + ": output shapes [N], [N, 5], [N, K], [N, 0]");
  check_close(row_max, want_max, rtol, atol, name + ": row_max");
  check_close(sums, want_sums, rtol, atol,
              name + ": sums (rest | teacher | repeated | teacher columns | entropy sum)");
  check_close(gathered, want_gathered, rtol, atol, name + ": gathered");
  std::printf("%-48s %s\n", name.c_str(), g_failed == failed_before ? "ok" : "FAILED");
}

// ids [N, K]: padding (-1), duplicates, ids below and above this shard, ids at both shard edges.
at::Tensor make_ids(int64_t N, int64_t K, int64_t vocab_start, int64_t V_r, int64_t V, at::ScalarType dtype) {
  auto ids = at::randint(0, V, {N, K}, at::kLong);
  auto a = ids.accessor<int64_t, 2>();
  for (int64_t n = 0; n < N; ++n) {
    if (K >= 6) {
      a[n][0] = vocab_start + (n % V_r);            // in shard
      a[n][1] = a[n][0];                            // duplicate of entry 0
      a[n][2] = -1;                                 // padding
      a[n][3] = vocab_start;                        // first column of the shard
      a[n][4] = vocab_start + V_r - 1;              // last column of the shard
      a[n][5] = vocab_start > 0 ? vocab_start - 1 : vocab_start + V_r;  // just outside
    }
  }
  if (N > 1) ids[N - 1].fill_(-1);                  // an all-padding row
  return ids.to(dtype);
}

}  // namespace

int main() {
  at::manual_seed(0);

  // Every op of the library is registered, with its schema.
  for (const char* name : {"topk_distill::shard_pass", "topk_distill::epilogue", "topk_distill::backward",
                           "topk_distill::backward_"}) {
    auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    check(handle.has_value(), std::string("schema registered: ") + name);
  }
  auto handle = c10::Dispatcher::singleton().findSchema({"topk_distill::shard_pass", ""});
  check(handle && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU), "shard_pass has a CPU kernel");
  if (g_failed) {
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return 1;
  }

  const int64_t V = 300;  // global vocab
  {
    // Middle shard of an uneven 3-way split, fp32, int64 ids, temperature 0.7.
    const int64_t vs = 97, Vr = 120, N = 7, K = 9;
    auto logits = at::randn({N, Vr}) * 3;
    run_case("fp32 / int64 ids / shard [97, 217) / T=0.7", logits, make_ids(N, K, vs, Vr, V, at::kLong), vs,
             1.0 / 0.7, 1e-5, 1e-6);
  }
  {
    // fp64 logits: acc is fp64, tight tolerance; int32 ids; whole vocab.
    const int64_t N = 5, K = 6;
    auto logits = at::randn({N, V}, at::kDouble) * 5;
    run_case("fp64 / int32 ids / whole vocab / T=1", logits, make_ids(N, K, 0, V, V, at::kInt), 0, 1.0, 1e-12,
             1e-13);
  }
  {
    // Rows with a stride larger than V_r (a column slice of a wider tensor), last shard.
    const int64_t vs = 217, Vr = V - vs, N = 4, K = 8;
    auto wide = at::randn({N, Vr + 13});
    auto logits = wide.narrow(1, 5, Vr);
    check(!logits.is_contiguous() && logits.stride(1) == 1, "strided case really has a row stride");
    run_case("fp32 / row-strided logits / last shard / T=2", logits, make_ids(N, K, vs, Vr, V, at::kLong), vs,
             0.5, 1e-5, 1e-6);
  }
  {
    // Extreme logits (+-1e4): the row max keeps every exp finite. K > V_r.
    const int64_t vs = 10, Vr = 6, N = 3, K = 8;
    auto logits = at::randn({N, Vr});
    logits[0][2] = 1e4;
    logits[1].fill_(-1e4);
    logits[1][0] = 1e4;
    run_case("fp32 / logits +-1e4 / K > V_r", logits, make_ids(N, K, vs, Vr, 20, at::kLong), vs, 1.0, 1e-5,
             1e-6);
  }
  {
    // bf16 logits: acc is fp32; the reference sees the same bf16 values.
    const int64_t vs = 0, Vr = 64, N = 4, K = 6;
    auto logits = (at::randn({N, Vr}) * 2).to(at::kBFloat16);
    run_case("bf16 / int64 ids / T=1", logits, make_ids(N, K, vs, Vr, 128, at::kLong), vs, 1.0, 1e-5, 1e-6);
  }

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
