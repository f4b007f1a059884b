# bench/dicom.cmake — DICOM decode + windowing (model/dicom.h) for a 512 x 512 CT slice, a
# 3000 x 3000 X-ray and a 2048 x 2048 JPEG 2000, beside the PNG path of the same sizes,
# measured in the same run (bench/dicom/bench_dicom.c). The images are generated once into
# <build>/bench-data/dicom by bench/dicom/make_images.py (pydicom; GDCM encodes the JPEG 2000).
add_executable(bench_dicom ${CMAKE_CURRENT_SOURCE_DIR}/dicom/bench_dicom.c)
target_link_libraries(bench_dicom PRIVATE mm_model)
list(APPEND MM_BENCH_COMMANDS
     "/usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/dicom/make_images.py ${CMAKE_BINARY_DIR}/bench-data/dicom && ${CMAKE_BINARY_DIR}/bench/bench_dicom ${CMAKE_BINARY_DIR}/bench-data/dicom 5")
