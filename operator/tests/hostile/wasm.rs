//! A CPU-bound wasm task built here from WAT text: it spins until a chosen number of seconds
//! of the monotonic clock have passed (WASI `clock_time_get`), so its CPU time is its wall time.

/// A WASI preview 1 command that burns one core for `seconds`.
pub fn cpu_burner(seconds: u64) -> Vec<u8> {
    let nanos = seconds * 1_000_000_000;
    let text = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  ;; Monotonic clock (id 1) into memory at 0, then read back.
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 0)))
    (i64.load (i32.const 0)))
  (func (export "_start")
    (local $end i64) (local $i i32)
    (local.set $end (i64.add (call $now) (i64.const {nanos})))
    (loop $outer
      ;; Pure work between clock reads, so the time is spent computing, not in the host.
      (local.set $i (i32.const 200000))
      (loop $inner
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (br_if $inner (local.get $i)))
      (br_if $outer (i64.lt_u (call $now) (local.get $end))))))"#
    );
    wat::parse_str(&text).expect("the burner's WAT parses")
}
