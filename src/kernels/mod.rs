//! verity's own CUDA kernels: their CUDA C sources, compiled at run time with NVRTC (no
//! nvcc at build time; NVRTC needs no GPU, so every CUDA build's tests compile them).
//! Each kernel has a reference written for any device that it is tested against:
//! `row_reduce.cu` ↔ `RowReduce::cpu_fwd` (src/engine/reduce.rs), `decode_attention.cu` ↔
//! `Transformer::attend` (src/model/llama/step.rs).

/// The decode step's per-row reduction: token, statistics, candidates.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ROW_REDUCE: Kernel = Kernel {
    module: "verity_row_reduce",
    source: include_str!("row_reduce.cu"),
};

/// Batched decode attention over the engine's KV segments.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const DECODE_ATTENTION: Kernel = Kernel {
    module: "verity_decode_attention",
    source: include_str!("decode_attention.cu"),
};

/// One CUDA C source file, loaded as one module.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kernel {
    /// The module's name in the device's cache of loaded modules.
    pub module: &'static str,
    pub source: &'static str,
}

#[cfg(feature = "cuda")]
impl Kernel {
    /// The kernel's PTX, compiled once per process; the error carries NVRTC's log.
    pub fn ptx(&self) -> Result<&'static str, String> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static CACHE: OnceLock<Mutex<HashMap<&'static str, &'static Result<String, String>>>> =
            OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = *cache
            .entry(self.module)
            .or_insert_with(|| Box::leak(Box::new(compile(self.source))));
        entry.as_deref().map_err(Clone::clone)
    }

    /// `function` of this kernel's module on `device`, loaded once per device; launch it
    /// on `device.cuda_stream()` (candle's one stream, which orders it with candle's ops).
    pub fn function(
        &self,
        device: &candle_core::CudaDevice,
        function: &str,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        let ptx = self.ptx().map_err(candle_core::Error::msg)?;
        Ok(device
            .get_or_load_custom_func(function, self.module, ptx)?
            .into_cuda_function())
    }
}

/// CUDA C to PTX for the driver's default virtual architecture, which the driver
/// JIT-compiles for whatever GPU it finds.
#[cfg(feature = "cuda")]
fn compile(source: &str) -> Result<String, String> {
    use candle_core::cuda_backend::cudarc::nvrtc;
    nvrtc::compile_ptx_with_opts(source, nvrtc::CompileOptions::default())
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("NVRTC could not compile a verity kernel: {e}"))
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// A syntax error in a kernel fails every CUDA build's tests, GPU or not.
    #[test]
    fn every_kernel_compiles_to_ptx() {
        for (kernel, entries) in [
            (ROW_REDUCE, &["verity_row_reduce"][..]),
            (
                DECODE_ATTENTION,
                &[
                    "verity_decode_attention_bf16",
                    "verity_decode_attention_f16",
                    "verity_decode_attention_f32",
                ][..],
            ),
        ] {
            let ptx = kernel
                .ptx()
                .unwrap_or_else(|e| panic!("{}: {e}", kernel.module));
            for entry in entries {
                assert!(ptx.contains(&format!(".entry {entry}")), "{entry}");
            }
        }
    }
}
