//! The one bit-stream layout behind both packed formats, and byte helpers: values of `bits`
//! bits, value i at stream bits i·bits.. (a value may straddle two 32-bit words), little-endian.

use anyhow::{ensure, Result};

pub fn i32s_to_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn i64s_to_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_i32s(b: &[u8]) -> Result<Vec<i32>> {
    ensure!(
        b.len().is_multiple_of(4),
        "int32 tensor: {} bytes is not a multiple of 4",
        b.len()
    );
    Ok(b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Pack `n` unsigned `bits`-bit values (n·bits a multiple of 32) as one little-endian bit stream
/// into n·bits/32 words: value i occupies stream bits i·bits.. (it may straddle two words).
pub fn pack_stream(values: &[u32], bits: u32) -> Result<Vec<u32>> {
    ensure!(
        (values.len() * bits as usize).is_multiple_of(32),
        "pack: {} values of {bits} bits do not fill whole 32-bit words",
        values.len()
    );
    pack_bits(values, bits)
}

/// [`pack_stream`] for any `n`: ceil(n·bits/32) words, the unused high bits of the last word
/// zero. The one bit-stream layout behind both formats we pack.
pub fn pack_bits(values: &[u32], bits: u32) -> Result<Vec<u32>> {
    let nbits = values.len() * bits as usize;
    let mask = (1u64 << bits) - 1;
    let mut words = vec![0u32; nbits.div_ceil(32)];
    for (i, &v) in values.iter().enumerate() {
        ensure!(
            (v as u64) <= mask,
            "pack: value {v} does not fit in {bits} bits"
        );
        let bit = i * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let wide = (v as u64) << off;
        words[w] |= wide as u32;
        if off + bits as usize > 32 {
            words[w + 1] |= (wide >> 32) as u32;
        }
    }
    Ok(words)
}

/// Inverse of [`pack_stream`]: `n` values of `bits` bits.
pub fn unpack_stream(words: &[u32], n: usize, bits: u32) -> Result<Vec<u32>> {
    ensure!(
        words.len() * 32 >= n * bits as usize,
        "unpack: {} words hold fewer than {n} {bits}-bit values",
        words.len()
    );
    let mask = (1u64 << bits) - 1;
    Ok((0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let (w, off) = (bit / 32, bit % 32);
            let mut x = (words[w] as u64) >> off;
            if off + bits as usize > 32 {
                x |= (words[w + 1] as u64) << (32 - off);
            }
            (x & mask) as u32
        })
        .collect())
}
