//! The request-path load bench (issue 12); being written.

fn main() {}
