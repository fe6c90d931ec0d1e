//! Property: any bytes give a model whose tensors have the sizes its config says, or an `Err`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mnistconv::checkpoint::from_bytes;
use mnistconv::Params;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = from_bytes(data, std::path::Path::new("fuzz")) {
        let want = Params::<f32>::zeros(&m.cfg);
        for ((n, a), (_, b)) in m.params.tensors().into_iter().zip(want.tensors()) {
            assert_eq!(a.len(), b.len(), "{n}");
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
});
