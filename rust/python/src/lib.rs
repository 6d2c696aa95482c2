//! PyO3 bindings for ferroquant-core (OWNER: bindings helper).
use pyo3::prelude::*;

#[pymodule]
fn _core(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
