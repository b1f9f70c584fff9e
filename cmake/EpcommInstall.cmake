# Installs the library, headers and a CMake package: find_package(epcomm) gives epcomm::epcomm.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS epcomm epcomm_reference EXPORT epcommTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/epcomm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT epcommTargets NAMESPACE epcomm:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/epcommConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/epcommConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/epcommConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/epcommConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/epcomm)
