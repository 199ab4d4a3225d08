//! A pickle (protocol 2) encoder for [`Value`] trees, emitting the opcodes `torch.save`
//! emits, so that `torch.load(..., weights_only=True)` accepts the result.
//!
//! Tensors become `torch._utils._rebuild_tensor_v2(<persistent storage id>, 0, size,
//! stride, False, collections.OrderedDict())`; the storage id is the tuple
//! `("storage", torch.<Type>Storage, "<key>", "cpu", numel)` and its bytes live in the zip
//! at `archive/data/<key>`. No memo is written: every object is emitted once.

use super::{Tensor, Value};

const PROTO: u8 = 0x80;
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const EMPTY_TUPLE: u8 = b')';
const MARK: u8 = b'(';
const SETITEMS: u8 = b'u';
const APPENDS: u8 = b'e';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const BINUNICODE: u8 = b'X';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const NONE: u8 = b'N';
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';
const BINPERSID: u8 = b'Q';
const STOP: u8 = b'.';

/// Encodes one value tree. Tensor storages are collected in [`Encoder::storages`], in the
/// order of their keys (`"0"`, `"1"`, …).
pub(super) struct Encoder<'a> {
    pub out: Vec<u8>,
    pub storages: Vec<&'a Tensor>,
}

impl<'a> Encoder<'a> {
    pub fn encode(value: &'a Value) -> Self {
        let mut e = Encoder { out: vec![PROTO, 2], storages: Vec::new() };
        e.value(value);
        e.out.push(STOP);
        e
    }

    fn value(&mut self, v: &'a Value) {
        match v {
            Value::None => self.out.push(NONE),
            Value::Bool(b) => self.out.push(if *b { NEWTRUE } else { NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::Float(f) => {
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::List(items) => {
                self.out.push(EMPTY_LIST);
                if !items.is_empty() {
                    self.out.push(MARK);
                    for item in items {
                        self.value(item);
                    }
                    self.out.push(APPENDS);
                }
            }
            Value::Dict(items) => {
                self.out.push(EMPTY_DICT);
                if !items.is_empty() {
                    self.out.push(MARK);
                    for (k, item) in items {
                        self.str(k);
                        self.value(item);
                    }
                    self.out.push(SETITEMS);
                }
            }
            Value::Tensor(t) => self.tensor(t),
        }
    }

    fn int(&mut self, i: i64) {
        if (0..=0xff).contains(&i) {
            self.out.extend_from_slice(&[BININT1, i as u8]);
        } else if (0..=0xffff).contains(&i) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(i as u16).to_le_bytes());
        } else if i32::try_from(i).is_ok() {
            self.out.push(BININT);
            self.out.extend_from_slice(&(i as i32).to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's-complement form.
            let bytes = i.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[LONG1, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn usize_tuple(&mut self, xs: &[usize]) {
        match xs.len() {
            0 => self.out.push(EMPTY_TUPLE),
            n => {
                if n > 3 {
                    self.out.push(MARK);
                }
                for &x in xs {
                    self.int(x as i64);
                }
                self.out.push(match n {
                    1 => TUPLE1,
                    2 => TUPLE2,
                    3 => TUPLE3,
                    _ => TUPLE,
                });
            }
        }
    }

    fn tensor(&mut self, t: &'a Tensor) {
        let key = self.storages.len();
        self.storages.push(t);
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(MARK);
        // The persistent id of the storage.
        self.out.push(MARK);
        self.str("storage");
        self.global("torch", t.dtype().storage_class());
        self.str(&key.to_string());
        self.str("cpu");
        self.int(t.numel() as i64);
        self.out.push(TUPLE);
        self.out.push(BINPERSID);
        // storage_offset, size, stride (contiguous), requires_grad, backward_hooks.
        self.int(0);
        self.usize_tuple(t.shape());
        self.usize_tuple(&t.contiguous_strides());
        self.out.push(NEWFALSE);
        self.global("collections", "OrderedDict");
        self.out.push(EMPTY_TUPLE);
        self.out.push(REDUCE);
        self.out.push(TUPLE);
        self.out.push(REDUCE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_bytes(i: i64) -> Vec<u8> {
        let v = Value::Int(i);
        let e = Encoder::encode(&v);
        e.out[2..e.out.len() - 1].to_vec()
    }

    #[test]
    fn ints_use_the_shortest_opcode() {
        assert_eq!(int_bytes(5), [BININT1, 5]);
        assert_eq!(int_bytes(300), [BININT2, 0x2c, 0x01]);
        assert_eq!(int_bytes(-5), [BININT, 0xfb, 0xff, 0xff, 0xff]);
        // 2**40, as Python's pickle writes it.
        assert_eq!(int_bytes(1 << 40), [LONG1, 6, 0, 0, 0, 0, 0, 1]);
        assert_eq!(int_bytes(i64::MIN), [LONG1, 8, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        assert_eq!(int_bytes(-(1 << 40)), [LONG1, 6, 0, 0, 0, 0, 0, 0xff]);
    }

    #[test]
    fn containers_match_pythons_encoding() {
        let v = Value::Dict(vec![
            ("b".into(), Value::List(vec![Value::Int(1), Value::Float(2.5), Value::None, Value::Bool(true)])),
            ("e".into(), Value::Dict(vec![])),
        ]);
        let e = Encoder::encode(&v);
        let mut want = vec![PROTO, 2, EMPTY_DICT, MARK, BINUNICODE, 1, 0, 0, 0, b'b', EMPTY_LIST, MARK, BININT1, 1];
        want.push(BINFLOAT);
        want.extend_from_slice(&2.5f64.to_be_bytes());
        want.extend_from_slice(&[NONE, NEWTRUE, APPENDS, BINUNICODE, 1, 0, 0, 0, b'e', EMPTY_DICT, SETITEMS, STOP]);
        assert_eq!(e.out, want);
    }
}
