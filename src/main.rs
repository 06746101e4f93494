fn main() -> std::process::ExitCode {
    abproxy::cli::main()
}
