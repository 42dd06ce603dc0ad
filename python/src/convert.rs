//! Values between Python and JSON: `to_json` (checked, with the place of a bad value) and `to_py`.
//!
//! Limits: a value nests at most [`MAX_DEPTH`] levels; integers fit in 64 bits (i64 or u64);
//! floats are finite; dict keys are str; only dict, list, tuple, str, int, float, bool and None
//! convert.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// How deep a value from Python may nest (a list that holds itself would never end).
const MAX_DEPTH: usize = 64;

/// A Python value as JSON; `at` names the place for the error (`arguments.phone`). The place
/// is built only when something is wrong: a good value costs no path strings.
pub(crate) fn to_json(v: &Bound<'_, PyAny>, at: &str) -> PyResult<Value> {
    convert(v, 0).map_err(|bad| {
        let mut place = at.to_string();
        for seg in bad.path.iter().rev() {
            place.push_str(seg);
        }
        match bad.why {
            Why::Type(m) => PyTypeError::new_err(format!("{place}: {m}")),
            Why::Value(m) => PyValueError::new_err(format!("{place}: {m}")),
            Why::Python(e) => e,
        }
    })
}

/// What is wrong with a value, and where (innermost segment first: `.when`, `[2]`).
struct Bad {
    path: Vec<String>,
    why: Why,
}

enum Why {
    Type(String),
    Value(String),
    Python(PyErr),
}

impl Bad {
    fn new(why: Why) -> Bad {
        Bad {
            path: Vec::new(),
            why,
        }
    }

    fn at(mut self, seg: String) -> Bad {
        self.path.push(seg);
        self
    }
}

impl From<PyErr> for Bad {
    fn from(e: PyErr) -> Bad {
        Bad::new(Why::Python(e))
    }
}

fn convert(v: &Bound<'_, PyAny>, depth: usize) -> Result<Value, Bad> {
    if depth > MAX_DEPTH {
        return Err(Bad::new(Why::Value(format!(
            "nested more than {MAX_DEPTH} levels deep"
        ))));
    }
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if let Ok(i) = v.cast::<PyInt>() {
        if let Ok(n) = i.extract::<i64>() {
            return Ok(Value::from(n));
        }
        if let Ok(n) = i.extract::<u64>() {
            return Ok(Value::from(n));
        }
        return Err(Bad::new(Why::Value(
            "the integer does not fit in 64 bits".into(),
        )));
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        let x = f.value();
        return Number::from_f64(x).map(Value::Number).ok_or_else(|| {
            Bad::new(Why::Value(format!(
                "{x} is not a JSON number (NaN or infinite)"
            )))
        });
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut m = Map::with_capacity(d.len());
        for (k, x) in d.iter() {
            let Ok(key) = k.cast::<PyString>() else {
                return Err(Bad::new(Why::Type(format!(
                    "a key of type {} is not JSON-compatible (keys are str)",
                    type_name(&k)
                ))));
            };
            let key = key.to_cow()?.into_owned();
            match convert(&x, depth + 1) {
                Ok(val) => {
                    m.insert(key, val);
                }
                Err(bad) => return Err(bad.at(format!(".{key}"))),
            }
        }
        return Ok(Value::Object(m));
    }
    if let Ok(l) = v.cast::<PyList>() {
        return array(l.iter(), l.len(), depth);
    }
    if let Ok(t) = v.cast::<PyTuple>() {
        return array(t.iter(), t.len(), depth);
    }
    Err(Bad::new(Why::Type(format!(
        "a value of type {} is not JSON-compatible (use dict, list, str, int, float, bool or None)",
        type_name(v)
    ))))
}

fn array<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    depth: usize,
) -> Result<Value, Bad> {
    let mut out = Vec::with_capacity(len);
    for (i, x) in items.enumerate() {
        out.push(convert(&x, depth + 1).map_err(|bad| bad.at(format!("[{i}]")))?);
    }
    Ok(Value::Array(out))
}

pub(crate) fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// JSON as Python objects (dicts keep the JSON's key order).
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}
