// epcomm._epcomm: the C++ core for Python, built without PyTorch (pybind11 + Python headers only).
// Errors become Python exceptions that name the argument (ArgumentError is a ValueError; device
// timeouts and CUDA/NCCL failures are RuntimeErrors); tensors, streams and events cross as
// described in views.hpp. The torch-facing layer is the pure-Python package around this module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "core/env.hpp"
#include "epcomm/config.hpp"
#include "epcomm/error.hpp"
#include "views.hpp"

#ifndef EPCOMM_CUDA_ARCHITECTURES
#define EPCOMM_CUDA_ARCHITECTURES ""
#endif
#ifndef EPCOMM_VERSION
#define EPCOMM_VERSION "0.0.0"
#endif

namespace py = pybind11;
using namespace epcomm;
using epcomm::python::PyEvent;

namespace {

PyObject* g_error = nullptr;           // epcomm.Error(RuntimeError)
PyObject* g_argument_error = nullptr;  // epcomm.ArgumentError(ValueError, epcomm.Error)
PyObject* g_timeout_error = nullptr;   // epcomm.TimeoutError(epcomm.Error)

// Inside a catch block whose exception is an epcomm::Error: its Python exception. Most derived
// first: every epcomm exception derives from epcomm::Error.
void set_epcomm_error() {
  try {
    throw;
  } catch (const ArgumentError& e) {
    PyErr_SetString(g_argument_error, e.what());
  } catch (const TimeoutError& e) {
    PyErr_SetString(g_timeout_error, e.what());
  } catch (const Error& e) {
    PyErr_SetString(g_error, e.what());
  }
}

void register_errors(py::module_& m) {
  const std::string prefix = m.attr("__name__").cast<std::string>() + ".";
  g_error = PyErr_NewExceptionWithDoc((prefix + "Error").c_str(),
                                      "An epcomm failure: CUDA or NCCL error, missing feature, device timeout.",
                                      PyExc_RuntimeError, nullptr);
  py::tuple arg_bases = py::make_tuple(py::handle(PyExc_ValueError), py::handle(g_error));
  g_argument_error = PyErr_NewExceptionWithDoc((prefix + "ArgumentError").c_str(),
                                               "A bad argument (dtype, shape, range, device, size); raised before "
                                               "anything is launched.",
                                               arg_bases.ptr(), nullptr);
  g_timeout_error = PyErr_NewExceptionWithDoc((prefix + "TimeoutError").c_str(),
                                              "A GPU wait ran past EPCOMM_TIMEOUT_MS; the message names kernel, phase, "
                                              "rank and peer.",
                                              g_error, nullptr);
  if (!g_error || !g_argument_error || !g_timeout_error) throw py::error_already_set();
  m.add_object("Error", py::handle(g_error));
  m.add_object("ArgumentError", py::handle(g_argument_error));
  m.add_object("TimeoutError", py::handle(g_timeout_error));
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error&) {
      set_epcomm_error();
    }
  });
}

Config make_config(int num_sms, int nvl_chunk_size, int nvl_buffer_size, int rdma_chunk_size, int rdma_buffer_size) {
  // Device-independent rules here; num_sms against the device's SM count when a call uses it.
  const std::pair<const char*, int> fields[] = {{"num_sms", num_sms},
                                                {"nvl_chunk_size", nvl_chunk_size},
                                                {"nvl_buffer_size", nvl_buffer_size},
                                                {"rdma_chunk_size", rdma_chunk_size},
                                                {"rdma_buffer_size", rdma_buffer_size}};
  for (const auto& [name, value] : fields)
    if (value < 1)
      throw ArgumentError(std::string("Config.") + name + " = " + std::to_string(value) + " must be positive");
  Config c;
  c.num_sms = num_sms;
  c.nvl_chunk_size = nvl_chunk_size;
  c.nvl_buffer_size = nvl_buffer_size;
  c.rdma_chunk_size = rdma_chunk_size;
  c.rdma_buffer_size = rdma_buffer_size;
  return c;
}

// Config(...) by epcomm's names or DeepEP's (SGLang builds Config(**json) from its --deepep-config
// with DeepEP's names); the positional order is the same for both. A field named twice is an error.
Config make_config_named(std::optional<int> num_sms, std::optional<int> nvl_chunk_size,
                         std::optional<int> nvl_buffer_size, std::optional<int> rdma_chunk_size,
                         std::optional<int> rdma_buffer_size, std::optional<int> nvl_send, std::optional<int> nvl_recv,
                         std::optional<int> rdma_send, std::optional<int> rdma_recv) {
  const auto pick = [](std::optional<int> ours, std::optional<int> deepep, const char* our_name,
                       const char* deepep_name, int fallback) {
    if (ours && deepep)
      throw ArgumentError(std::string("Config: ") + our_name + " and " + deepep_name +
                          " name the same field; pass one of them");
    return ours ? *ours : deepep ? *deepep : fallback;
  };
  const Config defaults;
  Config c = make_config(num_sms.value_or(defaults.num_sms),
                         pick(nvl_chunk_size, nvl_send, "nvl_chunk_size", "num_max_nvl_chunked_send_tokens",
                              defaults.nvl_chunk_size),
                         pick(nvl_buffer_size, nvl_recv, "nvl_buffer_size", "num_max_nvl_chunked_recv_tokens",
                              defaults.nvl_buffer_size),
                         pick(rdma_chunk_size, rdma_send, "rdma_chunk_size", "num_max_rdma_chunked_send_tokens",
                              defaults.rdma_chunk_size),
                         pick(rdma_buffer_size, rdma_recv, "rdma_buffer_size", "num_max_rdma_chunked_recv_tokens",
                              defaults.rdma_buffer_size));
  // What epcomm makes of DeepEP's values, on the "epcomm" logger at DEBUG (nothing is refused: a
  // tuned DeepEP config must keep working).
  const py::object logger = py::module_::import("logging").attr("getLogger")("epcomm");
  if (logger.attr("isEnabledFor")(10).cast<bool>()) {
    std::string notes;
    if (c.chunk_tokens() != c.nvl_chunk_size)
      notes += " chunks of " + std::to_string(c.nvl_chunk_size) + " tokens become " + std::to_string(c.chunk_tokens()) +
               " (epcomm's chunks hold 8 to 32 tokens);";
    if (c.ring_slots() * c.chunk_tokens() != c.nvl_buffer_size)
      notes += " a ring of " + std::to_string(c.nvl_buffer_size) + " tokens per SM becomes " +
               std::to_string(c.ring_slots()) + " slots of " + std::to_string(c.chunk_tokens()) +
               " tokens (1 to 16 slots);";
    if (rdma_chunk_size || rdma_send || rdma_buffer_size || rdma_recv)
      notes +=
          " the RDMA chunk sizes are not used by the kernels (the network hop sizes itself; only "
          "get_rdma_buffer_size_hint reads the RDMA buffer size);";
    if (!notes.empty()) logger.attr("debug")("epcomm " + c.describe() + ":" + notes);
  }
  return c;
}

// The size hints' arguments; returns the node size: ranks_per_node, or where 0 node_default's (0 without one).
int check_hint_args(long long hidden_bytes, int num_ranks, int ranks_per_node = 0, int (*node_default)() = nullptr) {
  if (hidden_bytes < 1) throw ArgumentError("hidden_bytes = " + std::to_string(hidden_bytes) + " must be positive");
  if (num_ranks < 1) throw ArgumentError("num_ranks = " + std::to_string(num_ranks) + " must be positive");
  if (ranks_per_node < 0) throw ArgumentError("ranks_per_node = " + std::to_string(ranks_per_node) + " must be >= 0");
  return ranks_per_node > 0 ? ranks_per_node : node_default != nullptr ? node_default() : 0;
}

void bind_config(py::module_& m) {
  py::class_<Config>(m, "Config",
                     "Tuning of the normal-mode kernels (DeepEP's Config, same positional order). Chunk sizes are "
                     "clamped into what the kernels support (docs/design-normal.md, \"Config\").")
      .def(py::init(&make_config_named), py::arg("num_sms") = py::none(), py::arg("nvl_chunk_size") = py::none(),
           py::arg("nvl_buffer_size") = py::none(), py::arg("rdma_chunk_size") = py::none(),
           py::arg("rdma_buffer_size") = py::none(), py::kw_only(),
           py::arg("num_max_nvl_chunked_send_tokens") = py::none(),
           py::arg("num_max_nvl_chunked_recv_tokens") = py::none(),
           py::arg("num_max_rdma_chunked_send_tokens") = py::none(),
           py::arg("num_max_rdma_chunked_recv_tokens") = py::none(),
           "Config(num_sms=24, nvl_chunk_size=32, nvl_buffer_size=128, rdma_chunk_size=16, rdma_buffer_size=128), "
           "positionally in DeepEP's order, or by DeepEP's keyword names (num_max_nvl_chunked_send_tokens = "
           "nvl_chunk_size, num_max_nvl_chunked_recv_tokens = nvl_buffer_size, and the RDMA pair). Values are "
           "clamped to what the kernels support; the 'epcomm' logger says how at DEBUG level.")
      .def_readwrite("num_sms", &Config::num_sms)
      .def_readwrite("nvl_chunk_size", &Config::nvl_chunk_size)
      .def_readwrite("nvl_buffer_size", &Config::nvl_buffer_size)
      .def_readwrite("rdma_chunk_size", &Config::rdma_chunk_size)
      .def_readwrite("rdma_buffer_size", &Config::rdma_buffer_size)
      // DeepEP's field names, for code that reads them.
      .def_readwrite("num_max_nvl_chunked_send_tokens", &Config::nvl_chunk_size)
      .def_readwrite("num_max_nvl_chunked_recv_tokens", &Config::nvl_buffer_size)
      .def_readwrite("num_max_rdma_chunked_send_tokens", &Config::rdma_chunk_size)
      .def_readwrite("num_max_rdma_chunked_recv_tokens", &Config::rdma_buffer_size)
      .def_property_readonly("chunk_tokens", &Config::chunk_tokens, "tokens per chunk after clamping")
      .def_property_readonly("ring_slots", &Config::ring_slots, "ring slots per SM after clamping")
      .def(
          "get_nvl_buffer_size_hint",
          [](const Config& c, long long hidden_bytes, int num_ranks, int ranks_per_node) {
            const int node = check_hint_args(hidden_bytes, num_ranks, ranks_per_node, &Config::nvl_hint_domain_ranks);
            return c.get_nvl_buffer_size_hint(static_cast<size_t>(hidden_bytes), num_ranks, node);
          },
          py::arg("hidden_bytes"), py::arg("num_ranks"), py::kw_only(), py::arg("ranks_per_node") = 0,
          "num_nvl_bytes this config needs for rows of hidden_bytes (DeepEP passes hidden * max(elem size, 2)): "
          "the rings of one node of min(num_ranks, ranks_per_node) ranks. ranks_per_node (an epcomm extension): "
          "0 = Config.nvl_hint_domain_ranks() (EPCOMM_RANKS_PER_NODE, else max(8, the visible GPUs))")
      .def(
          "get_rdma_buffer_size_hint",
          [](const Config& c, long long hidden_bytes, int num_ranks, int ranks_per_node) {
            const int node = check_hint_args(hidden_bytes, num_ranks, ranks_per_node, &Config::nvlink_domain_ranks);
            return c.get_rdma_buffer_size_hint(static_cast<size_t>(hidden_bytes), num_ranks, node);
          },
          py::arg("hidden_bytes"), py::arg("num_ranks"), py::kw_only(), py::arg("ranks_per_node") = 0,
          "num_rdma_bytes normal mode needs across nodes; 0 when num_ranks fit in one node (as DeepEP: no "
          "network memory inside one NVLink domain). ranks_per_node (an epcomm extension): 0 = "
          "Config.nvlink_domain_ranks() (EPCOMM_RANKS_PER_NODE, else the visible GPUs, else 8)")
      .def_static("nvl_hint_domain_ranks", &Config::nvl_hint_domain_ranks,
                  "the node size get_nvl_buffer_size_hint assumes (EPCOMM_RANKS_PER_NODE, else max(8, the visible "
                  "CUDA devices): DeepEP's rule of at most 8 NVLink peers, widened where more GPUs are visible)")
      .def_static("nvlink_domain_ranks", &Config::nvlink_domain_ranks,
                  "ranks per node as this process can tell without a communicator (EPCOMM_RANKS_PER_NODE, else "
                  "the visible CUDA devices, else 8)")
      .def_static(
          "dispatch_default",
          [](int num_ranks) {
            check_hint_args(1, num_ranks);
            return Config::dispatch_default(num_ranks);
          },
          py::arg("num_ranks"))
      .def_static(
          "combine_default",
          [](int num_ranks) {
            check_hint_args(1, num_ranks);
            return Config::combine_default(num_ranks);
          },
          py::arg("num_ranks"))
      .def("__repr__", &Config::describe)
      .def(py::pickle(
          [](const Config& c) {
            return py::make_tuple(c.num_sms, c.nvl_chunk_size, c.nvl_buffer_size, c.rdma_chunk_size,
                                  c.rdma_buffer_size);
          },
          [](const py::tuple& t) {
            return make_config(t[0].cast<int>(), t[1].cast<int>(), t[2].cast<int>(), t[3].cast<int>(),
                               t[4].cast<int>());
          }));
}

void bind_event(py::module_& m) {
  py::class_<PyEvent>(m, "Event", "An owned CUDA event (what async calls return).")
      .def_static(
          "record",
          [](py::handle stream, int device) { return PyEvent::record(python::to_stream(stream, "stream"), device); },
          py::arg("stream"), py::arg("device") = -1, "Creates an event on `device` and records it on `stream`.")
      .def(
          "wait", [](const PyEvent& e, py::handle stream) { e.wait(python::to_stream(stream, "stream")); },
          py::arg("stream"), "Makes `stream` (a cudaStream_t integer) wait for the event.")
      .def("synchronize", &PyEvent::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("query", &PyEvent::query)
      .def_property_readonly("ptr", [](const PyEvent& e) { return reinterpret_cast<uintptr_t>(e.get()); })
      .def_property_readonly("device", &PyEvent::device);
}

py::bytes get_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw RuntimeFailure(std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(r));
  return py::bytes(id.internal, sizeof(id.internal));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

// Only for tests of the error translation: raises the C++ exception `kind` with `message`.
void throw_for_test(const std::string& kind, const std::string& message) {
  if (kind == "argument") throw ArgumentError(message);
  if (kind == "timeout") throw TimeoutError(message);
  if (kind == "runtime") throw RuntimeFailure(message);
  if (kind == "error") throw Error(message);
  throw ArgumentError("kind: '" + kind + "' is not argument, timeout, runtime or error");
}

bool arch_compiled(const std::string& arch) {
  const std::string archs = std::string(";") + EPCOMM_CUDA_ARCHITECTURES + ";";
  for (const char* suffix : {"", "-real", "-virtual", "a", "a-real"})
    if (archs.find(";" + arch + suffix + ";") != std::string::npos) return true;
  return false;
}

}  // namespace

void python::set_python_error() {
  try {
    throw;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const Error&) {
    set_epcomm_error();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "epcomm: an unknown C++ exception");
  }
}

PYBIND11_MODULE(_epcomm, m) {
  m.doc() = "epcomm C++ core (no PyTorch): Runtime, Config, Event, errors. Use the epcomm package.";
  m.attr("__version__") = EPCOMM_VERSION;
  m.attr("cuda_architectures") = EPCOMM_CUDA_ARCHITECTURES;
  register_errors(m);
  bind_config(m);
  bind_event(m);
  python::bind_runtime(m);
  python::bind_low_latency(m);
  python::bind_eager(m);

  m.def("get_unique_id", &get_unique_id, "A fresh ncclUniqueId as bytes (rank 0 makes it, every rank passes it).");
  m.def("nccl_version", [] {
    int v = 0;
    ncclGetVersion(&v);
    return v;
  });
  m.def("device_count", &device_count, "Visible CUDA devices (0 when there is no driver or no GPU).");
  m.def(
      "internode_size_hint",
      [](int max_tokens_per_rank, int hidden, int num_ranks, int ranks_per_node, int num_topk,
         int max_experts_per_rank) {
        return Buffer::internode_size_hint(max_tokens_per_rank, hidden, num_ranks, ranks_per_node, num_topk,
                                           max_experts_per_rank);
      },
      py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("ranks_per_node"),
      py::arg("num_topk"), py::arg("max_experts_per_rank") = 1024,
      "num_rdma_bytes with which normal mode across nodes moves up to max_tokens_per_rank tokens per rank in one round "
      "(the Buffer's EPCOMM_MAX_TOKENS_PER_RANK) of `hidden` BF16 channels (Buffer::internode_size_hint)");
  m.def(
      "internode_windows",
      [](size_t num_rdma_bytes, int max_tokens_per_rank, int hidden, int num_ranks, int ranks_per_node, int num_topk,
         int max_experts_per_rank, int chunk) {
        const Buffer::InternodeWindows w =
            Buffer::internode_windows(num_rdma_bytes, max_tokens_per_rank, hidden, num_ranks, ranks_per_node, num_topk,
                                      max_experts_per_rank, chunk);
        return py::make_tuple(w.dispatch, w.combine);
      },
      py::arg("num_rdma_bytes"), py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"),
      py::arg("ranks_per_node"), py::arg("num_topk"), py::arg("max_experts_per_rank") = 1024, py::arg("chunk") = 32,
      "(dispatch, combine): the tokens per node one round of normal mode across nodes moves in a region of "
      "num_rdma_bytes (Buffer::internode_windows; 0: not one round fits)");
  m.def(
      "is_sm90_compiled", [] { return arch_compiled("90"); }, "Whether device code was built for sm_90.");
  m.def(
      "dtype_size", [](py::handle dtype) { return dtype_size(python::dtype_from_object(dtype, "dtype")); },
      py::arg("dtype"));
  m.def(
      "describe_view",
      [](py::handle tensor, const std::string& name) { return python::to_view(tensor, name.c_str()).describe(); },
      py::arg("tensor"), py::arg("name") = "tensor",
      "How the core sees a tensor-like object, e.g. '[4, 8] bfloat16 on cuda:0' (for tests and messages).");
  m.def("_set_tensor_reader", &python::set_tensor_reader, py::arg("capsule"),
        "Read torch.Tensor arguments in C++ through epcomm._torch_ops.tensor_reader (epcomm/_alloc.py sets it); "
        "None: back to the Python calls.");
  m.def(
      "_view_facts",
      [](py::handle tensor) {
        const TensorView v = python::to_view(tensor, "tensor");
        return py::make_tuple(reinterpret_cast<uintptr_t>(v.data), static_cast<int>(v.dtype),
                              py::tuple(py::cast(std::vector<int64_t>(v.shape.begin(), v.shape.begin() + v.ndim))),
                              py::tuple(py::cast(std::vector<int64_t>(v.strides.begin(), v.strides.begin() + v.ndim))),
                              v.device);
      },
      py::arg("tensor"), "(data_ptr, dtype code, shape, strides, device) as the binding reads a tensor (for tests).");
  m.def("_tensor_reader_set", &python::tensor_reader_set, "Whether _set_tensor_reader gave a reader.");
  m.def("_set_tensor_allocator", &python::set_tensor_allocator, py::arg("capsule"),
        "Make the eager low-latency calls' outputs in C++ through epcomm._torch_ops.tensor_allocator "
        "(epcomm/_alloc.py sets it); None: the eager calls decline and the Python layer allocates.");
  m.def("_tensor_allocator_set", &python::tensor_allocator_set, "Whether _set_tensor_allocator gave an allocator.");
  m.def(
      "_allocate_for_test",
      [](int device, const std::vector<std::tuple<int, std::vector<int64_t>, std::vector<int64_t>>>& specs,
         bool shared) {
        std::vector<EpcommTensorSpec> v;
        for (const auto& [dtype, shape, strides] : specs) {
          if (shape.size() > EPCOMM_TENSOR_MAX_DIMS || (!strides.empty() && strides.size() != shape.size()))
            throw ArgumentError("_allocate_for_test: at most 8 dimensions, strides empty or one per dimension");
          EpcommTensorSpec s{};
          s.dtype = dtype;
          s.ndim = static_cast<int>(shape.size());
          s.strided = strides.empty() ? 0 : 1;
          for (size_t i = 0; i < shape.size(); ++i) s.shape[i] = shape[i];
          for (size_t i = 0; i < strides.size(); ++i) s.strides[i] = strides[i];
          v.push_back(s);
        }
        std::vector<void*> data(v.size(), nullptr);
        py::tuple t = python::allocate_tensors(device, v, shared, data.data());
        py::list ptrs;
        for (void* d : data) ptrs.append(reinterpret_cast<uintptr_t>(d));
        return py::make_tuple(t, ptrs);
      },
      py::arg("device"), py::arg("specs"), py::arg("shared"),
      "(tensors, data pointers) made through the allocator _set_tensor_allocator gave (for tests); specs: "
      "(dtype code, shape, strides or []).");
  m.def("_throw_for_test", &throw_for_test, py::arg("kind"), py::arg("message"));
  m.def(
      "env_params",
      [] {
        py::list out;
        for (const EnvParam& p : env_params()) out.append(py::make_tuple(p.name, p.default_value, p.meaning));
        return out;
      },
      "epcomm's environment parameters: (name, default, meaning), as epcomm-bench --print-env lists them");
  m.def(
      "env_value", [](const std::string& name) { return env_value(name.c_str()); }, py::arg("name"),
      "The value epcomm uses for an EPCOMM_* variable (its default when unset); Error for an unknown name");
}
