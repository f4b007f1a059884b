/* sr.h — the DICOM Basic Text Structured Report that medmoe-pacs stores beside
 * the images it answered for (docs/PACS.md, "The report").
 *
 * Offers one builder: the fields below in, a DICOM Part 10 file out (Explicit
 * VR Little Endian, written element by element in ascending tag order — the
 * file is small and fixed in shape, so no DICOM toolkit is needed to write it).
 * The report:
 *   - joins the source's patient and study (the same StudyInstanceUID and
 *     patient attributes, copied), in a series of its own (Modality SR);
 *   - references the source study, series and instance in the Current
 *     Requested Procedure Evidence Sequence and, in the content tree, from the
 *     Finding by an IMAGE item (INFERRED FROM);
 *   - says who made it: the observer is a Device (DCM 121005 = 121007) named
 *     medmoe-pacs, the algorithm (DCM 111001/111003) is the model's variant
 *     and fingerprint, the experts that served the image are listed, a
 *     Comment says it is machine-generated, and VerificationFlag is
 *     UNVERIFIED.
 * Its SOP Instance and Series UIDs are given by the caller: medmoe-pacs derives
 * them from the source and the question with mm_sr_uid (so storing the same
 * answer twice stores one instance).
 *
 *     mm_sr_input in = {.study_uid = ..., .answer = "ct", ...};
 *     uint8_t *file = NULL; size_t n = 0;
 *     if (mm_sr_build(&in, &file, &n, err, sizeof err) != MM_OK) ...
 *     free(file);
 */
#ifndef MM_SR_H
#define MM_SR_H

#include <stddef.h>
#include <stdint.h>

#define MM_SR_UID_MAX 65 /* a DICOM UID is at most 64 characters, + NUL */

/* Every string is borrowed, UTF-8; NULL = empty (type 2 attributes stay, empty). */
typedef struct mm_sr_input {
    /* the source image: StudyInstanceUID, SeriesInstanceUID, SOP Class and Instance UIDs (all
     * required) */
    const char *study_uid, *series_uid, *sop_class_uid, *sop_uid;
    /* copied from the source so the PACS files the report with its study */
    const char *patient_name, *patient_id, *patient_birth_date, *patient_sex;
    const char *study_date, *study_time, *study_id, *accession, *referring_physician;
    /* the report's own identity (required): UIDs from mm_sr_uid, SeriesNumber */
    const char *sr_sop_uid, *sr_series_uid;
    int sr_series_number;
    const char *content_date, *content_time; /* YYYYMMDD, HHMMSS (UTC): when it was made */
    /* what was asked and answered, and by what */
    const char *question, *answer;
    const char *model;             /* ServerInfo.model, the variant                     */
    const char *model_fingerprint; /* ServerInfo.model_fingerprint (64 hex) or a note   */
    const char *experts;           /* "ct (576 image tokens in 2 MoE layers), ..."      */
    const char *software_version;  /* medmoe-pacs's version                             */
    const char *device_uid;        /* Device Observer UID (mm_sr_uid of the fingerprint) */
} mm_sr_input;

/* Builds the report; *out is malloc'd (caller frees). MM_EINVAL names a
 * missing required field or a value too long for its VR; MM_ENOMEM. */
int mm_sr_build(const mm_sr_input *in, uint8_t **out, size_t *out_len, char *err, size_t errlen);

/* A UID under the 2.25 root (a UUID as a decimal integer, ITU-T X.667) made
 * from SHA-256 of the parts (each followed by a NUL byte): the same parts
 * always give the same UID, different parts different ones. Version nibble 8
 * (RFC 9562 custom), variant 10. */
void mm_sr_uid(const char *const *parts, size_t n, char out[MM_SR_UID_MAX]);

/* 1 when s is a syntactically valid UID: 1-64 characters, dot-separated
 * numbers without leading zeros. */
int mm_sr_uid_valid(const char *s);

#endif
