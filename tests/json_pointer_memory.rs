//! A `json:` source reads one field of a body that may be megabytes of numbers: it must not
//! build the whole document in memory to do so.

use abproxy::json_pointer::JsonPointer;

#[global_allocator]
static HEAP: dhat::Alloc = dhat::Alloc;

/// Bytes allocated while `work` runs.
fn allocated_by<T>(work: impl FnOnce() -> T) -> (T, u64) {
    let before = dhat::HeapStats::get().total_bytes;
    let result = work();
    (result, dhat::HeapStats::get().total_bytes - before)
}

#[test]
fn a_user_id_after_a_megabyte_of_features_is_read_without_building_the_document() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let features = vec!["0.123456"; 150_000].join(",");
    let body = format!(r#"{{"instances":[[{features}]],"user":{{"id":"u-42"}}}}"#);
    assert!(body.len() > 1 << 20);
    let pointer = JsonPointer::new("/user/id").expect("valid pointer");

    let (found, one_pass) = allocated_by(|| pointer.value_in(body.as_bytes()));
    assert_eq!(found, Some(serde_json::Value::from("u-42")));

    let (_, whole) = allocated_by(|| serde_json::from_slice::<serde_json::Value>(body.as_bytes()));
    // dhat's asserts save a heap profile (dhat-heap.json) when they fail.
    dhat::assert!(one_pass < 4096, "one pass allocated {} bytes", one_pass);
    dhat::assert!(
        whole > body.len() as u64,
        "the whole document took {} bytes",
        whole
    );
}
