"""Front ends (web page, Telegram, Discord): thin translations between a platform and `core`."""
