# Everyday commands. `just --list` shows them. (Install just with `pip install rust-just`.)

# Build every crate.
build:
    cargo build --workspace

# Run the whole platform in one process on SQLite under ./.anumate/.
dev:
    cargo run --release -- dev

# The whole suite: starts PostgreSQL if needed, lints, Rust tests, Python client.
test:
    scripts/test

# Lints: formatting, clippy, buf.
lint: fmt-check proto-lint
    cargo clippy --workspace --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Check formatting.
fmt-check:
    cargo fmt --all -- --check

# Lint the protos (buf from npm, installed into .tools/).
proto-lint:
    scripts/buf lint

# Check the protos for breaking changes against main.
proto-breaking:
    scripts/buf breaking --against '.git#branch=main'
