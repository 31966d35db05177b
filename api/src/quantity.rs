//! Kubernetes resource quantities: memory (`512Mi`, `4Gi`, `1e9`) and CPU (`500m`, `2`).
use crate::{Error, Result};

fn split_number(value: &str) -> Result<(f64, &str)> {
    let v = value.trim();
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(end);
    let n: f64 = num.parse().map_err(|_| Error::Quantity {
        value: value.to_string(),
        reason: "expected a number followed by an optional unit",
    })?;
    if !n.is_finite() {
        return Err(Error::Quantity {
            value: value.to_string(),
            reason: "must be a finite number",
        });
    }
    if n < 0.0 {
        return Err(Error::Quantity {
            value: value.to_string(),
            reason: "must not be negative",
        });
    }
    Ok((n, suffix))
}

/// The largest quantity accepted, in bytes or millicores: 2^53, below which every whole
/// number is exact in the floating point the units are applied in, and far below where
/// sums and the pod's limits could overflow.
pub const MAX_QUANTITY: u64 = 1 << 53;

fn whole(value: &str, n: f64) -> Result<u64> {
    let n = n.round();
    if !n.is_finite() || n > MAX_QUANTITY as f64 {
        return Err(Error::Quantity {
            value: value.to_string(),
            reason: "too large",
        });
    }
    Ok(n as u64)
}

/// Parses a memory quantity into bytes.
pub fn parse_memory(value: &str) -> Result<u64> {
    let (n, suffix) = split_number(value)?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        s if s.starts_with('e') || s.starts_with('E') => {
            let exp: i32 = s[1..].parse().map_err(|_| Error::Quantity {
                value: value.to_string(),
                reason: "bad exponent",
            })?;
            if !(0..=18).contains(&exp) {
                return Err(Error::Quantity {
                    value: value.to_string(),
                    reason: "exponent must be between 0 and 18",
                });
            }
            10f64.powi(exp)
        }
        _ => {
            return Err(Error::Quantity {
                value: value.to_string(),
                reason: "unknown unit (use Ki, Mi, Gi, Ti, k, M, G or T)",
            });
        }
    };
    whole(value, n * mult)
}

/// Parses a CPU quantity into millicores.
pub fn parse_cpu(value: &str) -> Result<u64> {
    let (n, suffix) = split_number(value)?;
    match suffix {
        "" => whole(value, n * 1000.0),
        "m" => whole(value, n),
        _ => Err(Error::Quantity {
            value: value.to_string(),
            reason: "unknown unit (use a core count like `2` or millicores like `500m`)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_memory("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("1e6").unwrap(), 1_000_000);
        assert_eq!(parse_memory("1.5Ki").unwrap(), 1536);
        assert!(parse_memory("4GB").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1Gi").is_err());
        assert!(parse_memory("1e99").is_err(), "overflows");
        assert!(parse_memory("1e-3").is_err());
        assert!(parse_memory("99999999Ti").is_err());
        assert!(parse_memory("inf").is_err());
        assert!(parse_memory("NaN").is_err());
        assert_eq!(parse_memory("8192Ti").unwrap(), MAX_QUANTITY);
    }

    #[test]
    fn cpu_units() {
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert_eq!(parse_cpu("500m").unwrap(), 500);
        assert_eq!(parse_cpu("0.5").unwrap(), 500);
        assert!(parse_cpu("2 cores").is_err());
        assert!(parse_cpu("1e300").is_err());
        assert!(parse_cpu("99999999999999999").is_err());
    }
}
