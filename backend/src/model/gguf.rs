//! GGUF files (llama.cpp's model format, versions 2 and 3): metadata, tensor directory, and
//! tensors dequantized to f32. Every read is bounds-checked: a truncated or corrupt file is an
//! error naming the file and what was being read, never a panic.

use super::{HostTensor, ModelError};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use switchyard_kernels::quant::{Format, QuantMatrix};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bound on tensor rank; GGML tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Bf16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// Name of a GGML type id, for error messages.
fn type_name(id: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (30, "BF16"),
    ];
    NAMES.iter().find(|(i, _)| *i == id).map_or_else(|| format!("type {id}"), |(_, n)| (*n).to_string())
}

/// One tensor's entry in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: `dims[0]` is the contiguous (innermost) one.
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: memmap2::Mmap,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| format!("{what}: length {n} is too large"))?;
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated while reading {what} at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value, String> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{key}: arrays nested too deeply"));
                }
                let item_type = self.u32(key)?;
                let count = self.u64(key)?;
                // Every item takes at least one byte: a count beyond the file is corrupt.
                if count > (self.bytes.len() - self.pos) as u64 {
                    return Err(format!("{key}: array of {count} items does not fit in the file"));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("{key}: unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    /// Opens and indexes a GGUF file (tensor data stays mapped, not read).
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let bad = |reason: String| ModelError::Weights { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only mapping; see `Shards::open` in weights.rs for the same reasoning.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut r = Reader { bytes: &map, pos: 0 };
        if r.take(4, "magic").map_err(bad)? != MAGIC {
            return Err(bad("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32("version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let tensor_count = r.u64("tensor count").map_err(bad)?;
        let kv_count = r.u64("metadata count").map_err(bad)?;
        let remaining = (map.len() - r.pos) as u64;
        if tensor_count > remaining || kv_count > remaining {
            return Err(bad(format!(
                "header claims {tensor_count} tensors and {kv_count} keys; the file is too small"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string("metadata key").map_err(bad)?;
            let ty = r.u32(&key).map_err(bad)?;
            let value = r.value(ty, &key, 0).map_err(bad)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string("tensor name").map_err(bad)?;
            let n_dims = r.u32(&name).map_err(bad)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("tensor {name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&name)).collect::<Result<Vec<_>, _>>().map_err(bad)?;
            let type_id = r.u32(&name).map_err(bad)?;
            let offset = r.u64(&name).map_err(bad)?;
            tensors.push(TensorInfo { name, dims, type_id, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(bad(format!("general.alignment {alignment} is not a power of two")));
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let gguf =
            GgufFile { path: path.to_path_buf(), version, metadata, tensors, data_start: data_start as usize, map };
        // Validate every tensor's extent now, so later reads cannot go out of bounds.
        for t in &gguf.tensors {
            gguf.extent(t)?;
        }
        Ok(gguf)
    }

    fn bad(&self, reason: String) -> ModelError {
        ModelError::Weights { path: self.path.clone(), reason }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Byte range of a tensor's data, checked against the file and the block size.
    fn extent(&self, t: &TensorInfo) -> Result<std::ops::Range<usize>, ModelError> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| {
            self.bad(format!(
                "tensor {} has quantization {}, which this engine does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
                t.name,
                type_name(t.type_id)
            ))
        })?;
        let (block_elems, block_bytes) = ty.block();
        let elements = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let elements = elements.ok_or_else(|| self.bad(format!("tensor {}: dimensions overflow", t.name)))?;
        if !t.dims[0].is_multiple_of(block_elems) {
            return Err(self.bad(format!(
                "tensor {}: row length {} is not a multiple of the {} block size {block_elems}",
                t.name,
                t.dims[0],
                type_name(t.type_id)
            )));
        }
        // Checked too: a header's dimensions can make the byte count wrap around to something
        // small that fits the file.
        let bytes = (elements / block_elems)
            .checked_mul(block_bytes)
            .ok_or_else(|| self.bad(format!("tensor {}: dimensions overflow", t.name)))?;
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(bytes)).filter(|&e| e <= self.map.len() as u64);
        match (start, end) {
            (Some(s), Some(e)) => Ok(s as usize..e as usize),
            _ => Err(self.bad(format!("tensor {}: data runs past the end of the file (truncated?)", t.name))),
        }
    }

    /// A weight matrix as the CPU kernels compute on it: block-quantized matrices stay in their
    /// blocks (repacked, every value kept), BF16 and F16 ones in their 16 bits; anything else is
    /// converted to f32.
    pub fn weight(&self, name: &str) -> Result<HostTensor, ModelError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.into() })?;
        let shape = t.shape();
        let format = match GgmlType::from_id(t.type_id) {
            Some(GgmlType::Bf16) if shape.len() == 2 => {
                return Ok(HostTensor::bf16(shape, self.words(t, bf16::from_le_bytes)?));
            }
            Some(GgmlType::F16) if shape.len() == 2 => {
                return Ok(HostTensor::f16(shape, self.words(t, f16::from_le_bytes)?));
            }
            Some(GgmlType::Q8_0) => Format::Q8_0,
            Some(GgmlType::Q4_0) => Format::Q4_0,
            Some(GgmlType::Q4_1) => Format::Q4_1,
            Some(GgmlType::Q5_0) => Format::Q5_0,
            Some(GgmlType::Q5_1) => Format::Q5_1,
            Some(GgmlType::Q4K) => Format::Q4_K,
            Some(GgmlType::Q5K) => Format::Q5_K,
            Some(GgmlType::Q6K) => Format::Q6_K,
            _ => return self.tensor(name),
        };
        if shape.len() != 2 {
            return self.tensor(name);
        }
        let range = self.extent(t)?;
        let matrix = QuantMatrix::from_ggml(format, shape[0], shape[1], &self.map[range])
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
        Ok(HostTensor::quantized(matrix))
    }

    /// A tensor of 16-bit values as they are stored, each read by `from`.
    fn words<T>(&self, t: &TensorInfo, from: fn([u8; 2]) -> T) -> Result<Vec<T>, ModelError> {
        Ok(self.map[self.extent(t)?].chunks_exact(2).map(|b| from([b[0], b[1]])).collect())
    }

    /// A tensor dequantized to f32, shaped in PyTorch order.
    pub fn tensor(&self, name: &str) -> Result<HostTensor, ModelError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.into() })?;
        let range = self.extent(t)?;
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| self.bad(format!("tensor {name}: unsupported type")))?;
        let data = dequantize(ty, &self.map[range], t.elements() as usize);
        Ok(HostTensor::new(t.shape(), data))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements (a whole number of blocks; the caller checked the length).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Bf16 => out.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (size, qs) = if ty == GgmlType::Q4_0 { (18, 2) } else { (20, 4) };
            for blk in bytes.chunks_exact(size) {
                let d = f16_at(blk, 0);
                let (offset, m) = if ty == GgmlType::Q4_0 { (8.0, 0.0) } else { (0.0, f16_at(blk, 2)) };
                let q = &blk[qs..qs + 16];
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(q.iter().map(|&b| ((b & 0xF) as f32 - offset) * d + m));
                out.extend(q.iter().map(|&b| ((b >> 4) as f32 - offset) * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (size, qh, offset) = if ty == GgmlType::Q5_0 { (22, 2, 16.0) } else { (24, 4, 0.0) };
            for blk in bytes.chunks_exact(size) {
                let d = f16_at(blk, 0);
                let m = if ty == GgmlType::Q5_0 { 0.0 } else { f16_at(blk, 2) };
                // Bit i of the 32-bit qh is element i's fifth bit.
                let high = u32::from_le_bytes([blk[qh], blk[qh + 1], blk[qh + 2], blk[qh + 3]]);
                let q = &blk[qh + 4..qh + 20];
                let value = |i: usize, nibble: u8| {
                    let five = u32::from(nibble) | (((high >> i) & 1) << 4);
                    (five as f32 - offset) * d + m
                };
                out.extend(q.iter().enumerate().map(|(i, &b)| value(i, b & 0xF)));
                out.extend(q.iter().enumerate().map(|(i, &b)| value(i + 16, b >> 4)));
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (size, qs) = if ty == GgmlType::Q4K { (144, 16) } else { (176, 48) };
            for blk in bytes.chunks_exact(size) {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                // Q5_K: bit j of qh[l] is the fifth bit of element l of sub-block j.
                let qh = &blk[16..48];
                // Eight 6-bit (scale, min) pairs packed in 12 bytes.
                let scale_min = |j: usize| -> (f32, f32) {
                    if j < 4 {
                        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
                    } else {
                        (
                            ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)) as f32,
                            ((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)) as f32,
                        )
                    }
                };
                for (chunk, q) in blk[qs..size].chunks_exact(32).enumerate() {
                    for (j, nibble) in [(2 * chunk, 0), (2 * chunk + 1, 4)] {
                        let (s, m) = scale_min(j);
                        out.extend(q.iter().enumerate().map(|(l, &b)| {
                            let five = if ty == GgmlType::Q5K { ((qh[l] >> j) & 1) << 4 } else { 0 };
                            d * s * (((b >> nibble) & 0xF) | five) as f32 - dmin * m
                        }));
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for blk in bytes.chunks_exact(210) {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u32| ((low | (((qh[l] >> shift) & 3) << 4)) as i32 - 32) as f32;
                        y[l] = d * sc[is] as i8 as f32 * q(ql[l] & 0xF, 0);
                        y[l + 32] = d * sc[is + 2] as i8 as f32 * q(ql[l + 32] & 0xF, 2);
                        y[l + 64] = d * sc[is + 4] as i8 as f32 * q(ql[l] >> 4, 4);
                        y[l + 96] = d * sc[is + 6] as i8 as f32 * q(ql[l + 32] >> 4, 6);
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
    }
    out
}
