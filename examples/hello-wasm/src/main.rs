//! Kommune example task: counts the primes below N and says hello from its task index.
//! Built as a WASI preview 1 command; see ../build.sh and ../../hello-wasm.yaml.

use std::env;
use std::process::ExitCode;

const DEFAULT_LIMIT: usize = 10_000;
/// The sieve holds one byte per number; past this the module would outgrow a small memory cap.
const MAX_LIMIT: usize = 50_000_000;

fn main() -> ExitCode {
    let limit = match parse_limit(env::args().nth(1)) {
        Ok(limit) => limit,
        Err(message) => {
            eprintln!("hello-wasm: {message}");
            return ExitCode::from(2);
        }
    };
    let index = env::var("KOMMUNE_TASK_INDEX").unwrap_or_else(|_| "?".into());
    let count = env::var("KOMMUNE_TASK_COUNT").unwrap_or_else(|_| "?".into());
    let greeting = env::var("GREETING").unwrap_or_else(|_| "hello".into());
    let primes = count_primes_below(limit);
    println!("{greeting} from task {index}/{count}: {primes} primes below {limit}");
    ExitCode::SUCCESS
}

fn parse_limit(arg: Option<String>) -> Result<usize, String> {
    let Some(arg) = arg else {
        return Ok(DEFAULT_LIMIT);
    };
    match arg.parse::<usize>() {
        Ok(limit) if limit <= MAX_LIMIT => Ok(limit),
        Ok(_) => Err(format!("N must be at most {MAX_LIMIT}, got {arg}")),
        Err(_) => Err(format!("N must be a non-negative integer, got {arg:?}")),
    }
}

/// Sieve of Eratosthenes over [0, limit).
fn count_primes_below(limit: usize) -> usize {
    if limit < 3 {
        return 0;
    }
    let mut composite = vec![false; limit];
    let mut count = 0;
    for n in 2..limit {
        if composite[n] {
            continue;
        }
        count += 1;
        let mut multiple = n * n;
        while multiple < limit {
            composite[multiple] = true;
            multiple += n;
        }
    }
    count
}
