//! Integration tests, compiled into one binary (faster links on 2 cores).

#[path = "../support/mod.rs"]
#[macro_use]
mod support;

mod automations;
mod cache;
mod cli;
mod config_errors;
mod console;
mod cts;
mod egress;
mod errors;
mod events;
mod examples;
mod exec;
mod fast_path;
mod fleet;
mod fuzz_corpus;
mod hostile;
mod observability;
mod operator;
mod serve;
mod session;
mod simulate;
mod templates;
mod tools;
