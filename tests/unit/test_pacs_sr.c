/* test_pacs_sr.c — the PACS bridge's SR writer and UID maker (clients/pacs/sr.h) alone.
 *
 * The end-to-end tests (tests/pacs/pacs_test.py) check that pydicom and DCMTK read what the
 * writer makes; here: the UID is the documented function of its parts (the expected value
 * was computed with Python's hashlib: sha256(b"a\0b\0"), first 16 bytes, version 8, variant
 * 10, as a decimal under 2.25), UID syntax, and that every bad field is refused by name. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "sr.h"
#include "status.h"

static void test_uid(void **state) {
    (void)state;
    const char *ab[] = {"a", "b"}, *ba[] = {"b", "a"}, *a_b[] = {"a\0b"};
    char u1[MM_SR_UID_MAX], u2[MM_SR_UID_MAX], u3[MM_SR_UID_MAX];
    mm_sr_uid(ab, 2, u1);
    assert_string_equal(u1, "2.25.191004135700780825255726766676780875037");
    mm_sr_uid(ab, 2, u2);
    assert_string_equal(u1, u2);
    mm_sr_uid(ba, 2, u3);
    assert_string_not_equal(u1, u3);
    mm_sr_uid(a_b, 1, u3); /* "a" alone, NUL-terminated: not the same as two parts */
    assert_string_not_equal(u1, u3);
    assert_true(mm_sr_uid_valid(u1));
    assert_true(strlen(u1) <= 64);
}

static void test_uid_valid(void **state) {
    (void)state;
    const char *good[] = {"1.2.3", "0.1", "2.25.0", "1.2.840.10008.5.1.4.1.1.88.11"};
    const char *bad[] = {
        "",     "1..2", "01.2",
        "1.02", "1.2.", ".1",
        "1.2a", "1.2 ", "1.22222222222222222222222222222222222222222222222222222222222222222"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++)
        assert_true(mm_sr_uid_valid(good[i]));
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_false(mm_sr_uid_valid(bad[i]));
}

static mm_sr_input s_input(void) {
    return (mm_sr_input){.study_uid = "1.2.3",
                         .series_uid = "1.2.3.4",
                         .sop_class_uid = "1.2.840.10008.5.1.4.1.1.2",
                         .sop_uid = "1.2.3.4.5",
                         .sr_sop_uid = "2.25.1",
                         .sr_series_uid = "2.25.2",
                         .device_uid = "2.25.3",
                         .question = "What modality is this image?",
                         .answer = "ct",
                         .content_date = "20260101",
                         .content_time = "120000"};
}

static void test_build(void **state) {
    (void)state;
    mm_sr_input in = s_input();
    uint8_t *f = NULL;
    size_t n = 0;
    char err[256];
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_OK);
    assert_true(n > 132 && (n & 1) == 0);
    assert_memory_equal(f + 128, "DICM", 4);
    /* (0002,0000) UL 4 = the length of the rest of the meta group, which ends where
     * (0008,xxxx) starts. */
    assert_memory_equal(f + 132, "\x02\x00\x00\x00UL\x04\x00", 8);
    uint32_t gl = f[140] | (uint32_t)f[141] << 8 | (uint32_t)f[142] << 16 | (uint32_t)f[143] << 24;
    assert_true(144 + gl + 2 <= n);
    assert_memory_equal(f + 144 + gl, "\x08\x00", 2);
    /* All text ASCII: no Specific Character Set; the first element is (0008,0012). */
    assert_memory_equal(f + 144 + gl, "\x08\x00\x12\x00", 4);
    free(f);
    in.answer = "\xc3\xa9"; /* UTF-8: then ISO_IR 192 is declared */
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_OK);
    assert_memory_equal(f + 144 + gl, "\x08\x00\x05\x00", 4);
    free(f);
}

static void test_build_refuses(void **state) {
    (void)state;
    char err[256];
    uint8_t *f = (uint8_t *)"x";
    size_t n = 1;
    mm_sr_input in = s_input();
    in.study_uid = NULL;
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_EINVAL);
    assert_non_null(strstr(err, "study_uid"));
    assert_null(f);
    assert_int_equal(n, 0);
    in = s_input();
    in.sop_uid = "1.2.x";
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_EINVAL);
    assert_non_null(strstr(err, "sop_uid"));
    in = s_input();
    in.accession = "AN-ACCESSION-NUMBER-TOO-LONG"; /* SH: 16 at most */
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_EINVAL);
    assert_non_null(strstr(err, "(0008,0050)"));
    in = s_input();
    in.answer = NULL;
    assert_int_equal(mm_sr_build(&in, &f, &n, err, sizeof err), MM_EINVAL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uid),
        cmocka_unit_test(test_uid_valid),
        cmocka_unit_test(test_build),
        cmocka_unit_test(test_build_refuses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
