//! JSON and numbers formatted exactly as Python formats them, so files qpipe writes diff
//! cleanly against files the legacy Python tools wrote.
//!
//! - [`dumps`]: `json.dumps(value, indent=2)` (the default `ensure_ascii=True`, no
//!   trailing newline; `json.dump` to a file writes the same bytes).
//! - [`repr_f64`]: `repr(float)` — the shortest round-trip digits, fixed notation for
//!   decimal exponents in `[-4, 16)`, else `d.ddde±XX`.
//! - [`format_e`]: `f"{x:.{prec}e}"`, e.g. `8.339e+00`.
//! - [`format_f`]: `f"{x:.{prec}f}"`, e.g. `8.0000`.
//!
//! Objects keep their key order (serde_json's `preserve_order`); integers stay integers
//! (`8`) and floats stay floats (`8.0`), as in Python.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// Split Rust's `{:e}` rendering (`d.ddde-N`) into its digits and decimal exponent.
fn sci_parts(s: &str) -> (String, i32) {
    let (mantissa, exp) = s.split_once('e').expect("`{:e}` output has an exponent");
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    (digits, exp.parse().expect("`{:e}` exponent is an integer"))
}

fn exp_suffix(exp: i32) -> String {
    format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

/// Python's `repr(x)` of a float: `0.1`, `8.0`, `1e-05`, `5.679434593730548e-06`, `1e+16`,
/// `inf`, `nan`.
pub fn repr_f64(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    // Rust's shortest round-trip digits fix how many digits Python prints; when two
    // candidates of that length are equally near (an exact binary tie), Python takes the
    // even one, so take the correctly rounded (ties-to-even) rendering at that length.
    let (shortest, _) = sci_parts(&format!("{:e}", x.abs()));
    let (digits, exp) = sci_parts(&format!("{:.*e}", shortest.len() - 1, x.abs()));
    if (-4..16).contains(&exp) {
        // Fixed notation, always with a fractional part.
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if n > exp + 1 {
            format!("{}.{}", &digits[..(exp + 1) as usize], &digits[(exp + 1) as usize..])
        } else {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{mantissa}{}", exp_suffix(exp))
    }
}

/// Python's `f"{x:.{prec}e}"`: `format_e(8.3385, 3) == "8.338e+00"` (correctly rounded,
/// ties to even on the exact binary value, as both languages do).
pub fn format_e(x: f64, prec: usize) -> String {
    if !x.is_finite() {
        return python_nonfinite(x);
    }
    let s = format!("{:.*e}", prec, x);
    let (mantissa, exp) = s.split_once('e').expect("`{:e}` output has an exponent");
    format!("{mantissa}{}", exp_suffix(exp.parse().expect("integer exponent")))
}

/// Python's `f"{x:.{prec}f}"`: `format_f(8.0, 4) == "8.0000"`.
pub fn format_f(x: f64, prec: usize) -> String {
    if !x.is_finite() {
        return python_nonfinite(x);
    }
    format!("{:.*}", prec, x)
}

fn python_nonfinite(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

/// Python's `str()` of a bool, as f-strings print it: `True` / `False`.
pub fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A JSON number as Python's `json` module writes it: integers as integers, floats via
/// `repr` (`NaN`, `Infinity`, `-Infinity` for the non-finite ones).
pub fn number(n: &serde_json::Number) -> String {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        if f.is_nan() {
            "NaN".into()
        } else if f.is_infinite() {
            if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
        } else {
            repr_f64(f)
        }
    } else {
        n.to_string()
    }
}

fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_value(out: &mut String, v: &Value, depth: usize) {
    let indent = |out: &mut String, d: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(d));
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                string(out, k);
                out.push_str(": ");
                write_value(out, item, depth + 1);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

/// `json.dumps(value, indent=2)`.
pub fn dumps(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

/// `json.dump(value, open(path, "w"), indent=2)`: the same bytes as [`dumps`].
pub fn write(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, dumps(value)).with_context(|| format!("could not write `{}`", path.display()))
}

/// Read a JSON file, keeping key order; errors name the file and the position.
pub fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("could not read `{}`", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("`{}` is not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn repr_matches_python() {
        // Expected strings are what CPython 3.12 prints for `repr(x)`.
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (8.0, "8.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.2e-5, "1.2e-05"),
            (5.679434593730548e-06, "5.679434593730548e-06"),
            (0.2731442424892343, "0.2731442424892343"),
            (7864320.0, "7864320.0"),
            (215815944.47968775, "215815944.47968775"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-3.25e-7, "-3.25e-07"),
            (123.456, "123.456"),
        ];
        for (x, want) in cases {
            assert_eq!(repr_f64(*x), *want, "repr({x:e})");
        }
    }

    #[test]
    fn repr_round_trips() {
        let mut x = 1.234_567_890_123e-12_f64;
        for _ in 0..200 {
            let s = repr_f64(x);
            assert_eq!(s.parse::<f64>().unwrap(), x, "{s}");
            x *= -3.7;
        }
    }

    #[test]
    fn format_e_and_f_match_python() {
        assert_eq!(format_e(8.3385, 3), "8.338e+00");
        assert_eq!(format_e(1.0625, 3), "1.062e+00");
        assert_eq!(format_e(0.03230519779026508, 3), "3.231e-02");
        assert_eq!(format_e(12451840.0, 3), "1.245e+07");
        assert_eq!(format_e(8.626292569147154e-08, 3), "8.626e-08");
        assert_eq!(format_e(0.0, 3), "0.000e+00");
        assert_eq!(format_e(5e-324, 3), "4.941e-324");
        assert_eq!(format_e(1.7976931348623157e308, 3), "1.798e+308");
        assert_eq!(format_e(0.2731442424892343, 6), "2.731442e-01");
        assert_eq!(format_e(-215815944.47968775, 6), "-2.158159e+08");
        assert_eq!(format_f(8.0, 4), "8.0000");
        assert_eq!(format_f(0.00012345, 4), "0.0001");
        assert_eq!(format_f(f64::NAN, 4), "nan");
    }

    #[test]
    fn dumps_matches_json_dumps_indent_2() {
        let v = json!({
            "scheme": {"name": "x", "bits": 8.0, "n": 128, "formats": ["A"], "empty": [], "none": {}},
            "ok": true, "null": null, "s": "caf\u{e9} \"q\"\n\u{1F600}",
            "xs": [1e-05, 0.5],
        });
        let want = r#"{
  "scheme": {
    "name": "x",
    "bits": 8.0,
    "n": 128,
    "formats": [
      "A"
    ],
    "empty": [],
    "none": {}
  },
  "ok": true,
  "null": null,
  "s": "caf\u00e9 \"q\"\n\ud83d\ude00",
  "xs": [
    1e-05,
    0.5
  ]
}"#;
        assert_eq!(dumps(&v), want);
    }

    #[test]
    fn dumps_reproduces_a_parsed_python_file_byte_for_byte() {
        let text = "{\n  \"a\": [\n    5.679434593730548e-06,\n    0.0\n  ],\n  \"b\": 252,\n  \"c\": 1e+16\n}";
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(dumps(&v), text);
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    /// Every float in `stages/tests/fixtures/pyformat.tsv` (written by CPython, see
    /// `scripts/make_pyformat_fixture.py`) formats exactly as Python formatted it.
    #[test]
    fn formats_match_cpython_on_the_fixture() {
        let text = include_str!("../../tests/fixtures/pyformat.tsv");
        let mut n = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let x = f64::from_bits(u64::from_str_radix(f[0], 16).unwrap());
            assert_eq!(repr_f64(x), f[1], "repr of {}", f[0]);
            assert_eq!(format_e(x, 3), f[2], ".3e of {}", f[1]);
            assert_eq!(format_e(x, 6), f[3], ".6e of {}", f[1]);
            if f[4] != "-" {
                assert_eq!(format_f(x, 4), f[4], ".4f of {}", f[1]);
            }
            assert_eq!(number(&serde_json::Number::from_f64(x).unwrap()), f[5], "json of {}", f[1]);
            n += 1;
        }
        assert!(n > 1000, "{n}");
    }
}
