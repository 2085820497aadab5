//! Decode attention for the whole batch in one CUDA launch per layer
//! (`src/kernels/decode_attention.cu`): a step where every sequence adds one token reads
//! each sequence's KV segments in place through a table of their addresses, uploaded once
//! per step. The reference is [`Transformer::attend`](super::Transformer), candle ops one
//! sequence at a time, which every other step (prefill chunks, the CPU) takes; a per-sequence
//! loop at batch 64 would be thousands of small launches per step on a GPU.

use candle_core::Tensor;

use super::step::StepInput;
use super::Transformer;
use crate::error::Result;

/// Query heads per KV head and head width the kernel holds (`GMAX`, `32·PER` in the .cu).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_GROUPS: usize = 8;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MAX_HEAD_DIM: usize = 128;

/// The KV addresses of one decode step, read by every layer's launch.
pub(super) struct DecodePlan {
    #[cfg(feature = "cuda")]
    table: candle_core::cuda_backend::cudarc::driver::CudaSlice<u64>,
    #[cfg(feature = "cuda")]
    seg_start: candle_core::cuda_backend::cudarc::driver::CudaSlice<i32>,
    /// Table entries per layer (3 per segment).
    #[cfg(feature = "cuda")]
    per_layer: usize,
}

impl Transformer {
    /// A plan when this step can take the batched kernel: a CUDA device, one new token per
    /// sequence, a head geometry and dtype the kernel holds, and `VERITY_REFERENCE_ATTENTION`
    /// unset (set, it selects the reference, to compare the two on a GPU).
    #[cfg(not(feature = "cuda"))]
    pub(super) fn decode_plan(&self, _batch: &[StepInput<'_>]) -> Result<Option<DecodePlan>> {
        Ok(None)
    }

    #[cfg(feature = "cuda")]
    pub(super) fn decode_plan(&self, batch: &[StepInput<'_>]) -> Result<Option<DecodePlan>> {
        use candle_core::{DType, Device};
        let c = &self.config;
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        let fits = batch.iter().all(|s| s.tokens.len() == 1)
            && c.num_heads.is_multiple_of(c.num_kv_heads)
            && c.num_heads / c.num_kv_heads <= MAX_GROUPS
            && c.head_dim <= MAX_HEAD_DIM
            && matches!(self.dtype, DType::BF16 | DType::F16 | DType::F32)
            && self.kv_geometry.dtype == self.dtype
            && std::env::var_os("VERITY_REFERENCE_ATTENTION").is_none();
        if !fits {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        let mut seg_start = vec![0i32];
        let mut segments = 0usize;
        for s in batch {
            segments += s.kv.shared_segments().len() + 1;
            seg_start.push(segments as i32);
        }
        let mut table = Vec::with_capacity(c.num_layers * segments * 3);
        for layer in 0..c.num_layers {
            for s in batch.iter() {
                for seg in s.kv.shared_segments() {
                    table.push(address(seg.key_buffer(layer), &stream)?);
                    table.push(address(seg.value_buffer(layer), &stream)?);
                    table.push(seg.len() as u64);
                }
                // The own segment: its stored positions and the one this step writes.
                let own = s.kv.own_segment();
                table.push(address(own.key_buffer(layer), &stream)?);
                table.push(address(own.value_buffer(layer), &stream)?);
                table.push(own.len() as u64 + 1);
            }
        }
        Ok(Some(DecodePlan {
            table: dev.clone_htod(&table)?,
            seg_start: dev.clone_htod(&seg_start)?,
            per_layer: segments * 3,
        }))
    }

    /// Writes `k`, `v` (B, KV, d) into each sequence's own segment and returns the
    /// attention of `q` (B, H, d) as (B, H·d), for one layer, in one launch.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn attend_decode(
        &self,
        _plan: &DecodePlan,
        _layer: usize,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
    ) -> Result<Tensor> {
        Err(crate::error::Error::Internal(
            "the batched decode attention needs the `cuda` feature".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    pub(super) fn attend_decode(
        &self,
        plan: &DecodePlan,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::{DType, Device};

        let c = &self.config;
        let (b, nh, hd) = q.dims3()?;
        let nkv = c.num_kv_heads;
        let Device::Cuda(dev) = &self.device else {
            return Err(crate::error::Error::Internal(
                "batched decode attention off the GPU".into(),
            ));
        };
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let out = Tensor::zeros((b, nh, hd), self.dtype, &self.device)?;
        let function = match self.dtype {
            DType::BF16 => "verity_decode_attention_bf16",
            DType::F16 => "verity_decode_attention_f16",
            _ => "verity_decode_attention_f32",
        };
        let func = crate::kernels::DECODE_ATTENTION.function(dev, function)?;
        let stream = dev.cuda_stream();
        let (qa, ka, va, oa) = (
            address(&q, &stream)?,
            address(&k, &stream)?,
            address(&v, &stream)?,
            address(&out, &stream)?,
        );
        let table = plan
            .table
            .slice(layer * plan.per_layer..(layer + 1) * plan.per_layer);
        let (nh_i, nkv_i, hd_i) = (nh as i32, nkv as i32, hd as i32);
        let scale = self.config.attention_scale() as f32;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&qa);
        builder.arg(&ka);
        builder.arg(&va);
        builder.arg(&table);
        builder.arg(&plan.seg_start);
        builder.arg(&oa);
        builder.arg(&nh_i);
        builder.arg(&nkv_i);
        builder.arg(&hd_i);
        builder.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (b as u32, nkv as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; every address is of a live
        // tensor of this device held until the launch is queued on the one stream candle
        // uses, which orders it after the ops that wrote them and before later readers.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out.reshape((b, nh * hd))?)
    }
}

/// The device address of a CUDA tensor's first element.
#[cfg(feature = "cuda")]
fn address(
    t: &Tensor,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{DType, Storage};
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(crate::error::Error::Internal(
            "a tensor of the GPU step is not on the GPU".into(),
        ));
    };
    let base = match t.dtype() {
        DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        other => {
            return Err(crate::error::Error::Internal(format!(
                "batched decode attention over {other:?} tensors"
            )))
        }
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}
