/* fuzz_tiktoken — *.tiktoken loading ("base64 rank" lines), encoding and
 * decoding from hostile bytes (input layout in fuzz_tokenizer.h). */
#include "fuzz_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    s_fuzz_tokenizer("fuzz.tiktoken", data, len);
    return 0;
}
