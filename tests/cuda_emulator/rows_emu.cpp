// The global-range exports of the row ops' emulator library (see rows_emu.h).
#include "rows_emu.h"

extern "C" {
void emu_register_global(const void* ptr, size_t bytes) { emu::register_global(ptr, bytes); }
void emu_clear_globals() { emu::clear_globals(); }
}
