//! Where tensors live: the one device option (`auto`, `cpu`, `cuda`, `cuda:N`), parsed once
//! at the composition root ([`crate::RuntimeBuilder`]) and resolved to a candle [`Device`].
//! Every tensor the engine, the KV cache, the statistics, the sampler and the trainer make
//! is made on the device the model was loaded on.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A device as a user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceSpec {
    /// The first CUDA device when this build has CUDA support and a GPU is present, else
    /// the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N (`cuda` alone is device 0).
    Cuda(usize),
}

impl DeviceSpec {
    /// The device to put tensors on. Asking for CUDA from a build without it, or on a
    /// machine without that GPU, is an error that names the device option.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(if cuda_built() {
                open_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }),
            DeviceSpec::Cuda(n) => {
                if !cuda_built() {
                    return Err(Error::InvalidArgument(format!(
                        "device '{self}': this build of verity has no CUDA support \
                         (rebuild with `--features cuda`, or use device 'cpu')"
                    )));
                }
                open_cuda(n).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "device '{self}': no usable CUDA device {n}: {e}"
                    ))
                })
            }
        }
    }
}

/// CUDA device N, with cudarc's per-buffer event tracking turned off.
///
/// candle gives its device a stream of its own, which puts cudarc in multi-stream mode: each
/// buffer then gets two CUDA events, and each use of a buffer as a kernel argument a stream
/// wait and an event record. A decode step on a GPU looked bound by host work per launch (an
/// H200 took 7 ms a token for a 1.5B model whose weights read in 0.7 ms; measured before
/// this change, its effect not yet), and the batched attention's address table alone made
/// 2 such calls per sequence, layer and K/V buffer.
/// Everything verity runs on the device goes through that one stream, in order, so the
/// events order nothing.
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: no tensor of this device is used on a stream other than the device's own
        // (verity's kernels launch on `cuda_stream()`), which is what the tracking guards.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// Whether this build can run on CUDA at all (the `cuda` feature).
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// A device's name as the device option writes it (`cpu`, `cuda:0`, ...).
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        other => format!("{:?}", other.location()),
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "device '{s}' is not one of auto, cpu, cuda, cuda:N"
            ))
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec, "{text}");
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "metal"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("auto, cpu, cuda"), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_and_auto_resolve_without_a_gpu() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        if !cuda_built() {
            assert!(DeviceSpec::Auto.resolve().unwrap().is_cpu());
            let err = DeviceSpec::Cuda(0).resolve().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)));
            let text = err.to_string();
            assert!(
                text.contains("device 'cuda:0'") && text.contains("--features cuda"),
                "{text}"
            );
        }
    }

    #[test]
    fn specs_round_trip_through_serde() {
        let json = serde_json::to_string(&DeviceSpec::Cuda(1)).unwrap();
        assert_eq!(json, "\"cuda:1\"");
        let back: DeviceSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, DeviceSpec::Cuda(1));
        assert!(serde_json::from_str::<DeviceSpec>("\"npu\"").is_err());
    }
}
