//! clawbus-emulator: the provider emulator (OpenAI, Anthropic and Gemini APIs) as a
//! process, for local runs and benchmarks. `clawbus-emulator [ADDR]` (default
//! 127.0.0.1:18800): `OPENAI_BASE_URL=http://ADDR/v1`, `ANTHROPIC_BASE_URL=http://ADDR`,
//! `GEMINI_BASE_URL=http://ADDR`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18800".into());
    let key = std::env::var("EMULATOR_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let emu = clawbus_testkit::Emulator::start_on(&addr, key.as_deref()).await?;
    println!("emulator listening on {}", emu.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
