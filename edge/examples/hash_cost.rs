//! The native cost of one password verification at several PBKDF2-HMAC-SHA256 iteration counts
//! (the best of 5), beside `e2e`'s `bench_password`, which measures the same in workerd:
//! `cargo run --release -p kiln-edge --example hash_cost`.

use std::time::Instant;

use kiln_edge::auth::password::{hash_with, ITERATIONS};

fn main() {
    println!("PBKDF2-HMAC-SHA256, native (this machine), best of 5; PASSWORD_ITERATIONS defaults to {ITERATIONS}");
    println!("{:>12} {:>10}", "iterations", "ms");
    for iterations in [100_000, 210_000, 310_000, 600_000, 1_000_000] {
        let best = (0..5)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(hash_with("Correct-Horse-9", &[7; 16], iterations));
                start.elapsed().as_secs_f64() * 1000.0
            })
            .fold(f64::MAX, f64::min);
        println!("{iterations:>12} {best:>10.1}");
    }
}
